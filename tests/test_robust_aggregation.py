"""Rounds no lying silo decides alone: `aggregation` puts one of Flower's robust rules in front
of each strategy's own aggregation. One silo of five scales its update by 100: FedAvg's model
follows it, each robust rule's stays with the honest silos'; the dtypes the silos sent are
kept, FGL's fine-tune still follows, and the config refuses what a rule cannot do. In a run,
through the attack harness (`benchmarks.attacks`): FedAvg falls to chance, the median does not;
the harness's data attacks write what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fgl_core.config import ConfigError, RunConfig
from strategies.build import build_strategy

GLOBAL = np.zeros(64, np.float32)
RULES = ["median", "trimmed-mean", "krum", "multi-krum"]


def replies(scale: float = 100.0, silos: int = 5) -> list[Message]:
    """Each honest silo's model: the global one plus a small update of its own; silo 0's update
    multiplied by `scale`. Each reply also carries an int64 counter (a BatchNorm's)."""
    rng = np.random.default_rng(0)
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                      message_type="train")  # fmt: skip
    out = []
    for silo in range(silos):
        update = (0.1 + 0.01 * rng.standard_normal(GLOBAL.shape)).astype(np.float32)
        weights = GLOBAL + (scale if silo == 0 else 1.0) * update
        arrays = {"w": torch.from_numpy(weights), "batches": torch.tensor(7 + silo)}
        content = RecordDict({"arrays": ArrayRecord(arrays),
                              "metrics": MetricRecord({"num-examples": 100})})  # fmt: skip
        out.append(Message(content, reply_to=request))
    return out


def aggregate(aggregation: str, **keys) -> ArrayRecord:
    cfg = RunConfig.from_flower({"aggregation": aggregation, "min-nodes": 5, **keys})
    arrays, _ = build_strategy(cfg).aggregate_train(1, replies())
    assert arrays is not None
    return arrays


@pytest.mark.parametrize("aggregation", RULES)
def test_a_silo_scaling_its_update_by_100_moves_fedavg_and_no_robust_rule(
    task_identity, aggregation
):
    fedavg = aggregate("fedavg")["w"].numpy()
    assert np.abs(fedavg - 0.1).max() > 1.5  # the mean follows the one liar ~20 x 0.1 away
    arrays = aggregate(aggregation)
    robust = arrays["w"].numpy()
    assert np.abs(robust - 0.1).max() < 0.05  # where the honest silos' updates lead
    assert robust.dtype == np.float32 and arrays["batches"].numpy().dtype == np.int64


@pytest.mark.parametrize("aggregation", ["krum", "multi-krum"])
def test_krum_says_which_silos_it_aggregated_and_leaves_the_liar_out(task_identity, aggregation):
    keys = {"aggregation": aggregation, "aggregation-select": 3, "min-nodes": 5}
    cfg = RunConfig.from_flower(keys)
    got = replies()
    for node, reply in enumerate(got, start=1):  # node 1 scales its update by 100
        reply.metadata.__dict__["_src_node_id"] = node
    _, metrics = build_strategy(cfg).aggregate_train(1, got)
    selected = {n: metrics[f"selected-node-{n}"] for n in range(1, 6)}
    assert selected[1] == 0.0
    assert sum(selected.values()) == (1 if aggregation == "krum" else 3)
    median = RunConfig.from_flower({"aggregation": "median"})  # it aggregates every reply
    _, metrics = build_strategy(median).aggregate_train(1, got)
    assert not any(key.startswith("selected-node-") for key in metrics)


def test_bulyan_needs_4f_plus_3_silos_and_then_holds(task_identity):
    with pytest.raises(ConfigError, match=r"bulyan.* needs at least 7 silos; min-nodes is 5"):
        RunConfig.from_flower({"aggregation": "bulyan", "min-nodes": 5})
    cfg = RunConfig.from_flower({"aggregation": "bulyan", "min-nodes": 7})
    arrays, _ = build_strategy(cfg).aggregate_train(1, replies(silos=7))
    assert np.abs(arrays["w"].numpy() - 0.1).max() < 0.05


def test_fgl_fine_tunes_what_the_robust_rule_aggregated(task_identity):
    seen = []

    def finetune(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        seen.append(arrays["w"].numpy().copy())
        return ArrayRecord({"w": torch.zeros(64), "batches": torch.tensor(0)})

    cfg = RunConfig.from_flower({"strategy": "fgl", "aggregation": "median", "min-nodes": 5})
    arrays, _ = build_strategy(cfg, finetune_fn=finetune).aggregate_train(1, replies())
    assert len(seen) == 1 and np.abs(seen[0] - 0.1).max() < 0.05  # the median, fine-tuned
    assert not arrays["w"].numpy().any()


def trusted(attack: str) -> tuple[ArrayRecord, MetricRecord, list[int]]:
    """FLTrust over `replies()` with silo 0's update changed by `attack`; the server's own
    update on the synthetic set is the honest direction. (arrays, metrics, calls' rounds)"""
    from deploy.inprocess import InProcessGrid

    calls = []

    def server_update(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        calls.append(server_round)
        start = arrays["w"].numpy()
        return ArrayRecord({"w": torch.from_numpy(start + np.float32(0.1)),
                            "batches": torch.tensor(3)})  # fmt: skip

    cfg = RunConfig.from_flower({"strategy": "fgl", "aggregation": "synthetic-trust"})
    strategy = build_strategy(cfg, server_update_fn=server_update)
    sent = ArrayRecord({"w": torch.from_numpy(GLOBAL), "batches": torch.tensor(0)})
    grid = InProcessGrid({n: None for n in range(1, 6)})
    list(strategy.configure_train(4, sent, ConfigRecord(), grid))
    got = replies(scale={"scale": 100.0, "sign": -100.0}[attack])
    for node, reply in enumerate(got, start=1):
        reply.metadata.__dict__["_src_node_id"] = node
    arrays, metrics = strategy.aggregate_train(4, got)
    return arrays, metrics, calls


@pytest.mark.parametrize("attack", ["scale", "sign"])
def test_synthetic_trust_weighs_each_update_by_its_agreement_with_the_servers(
    task_identity, attack
):
    arrays, metrics, calls = trusted(attack)
    assert calls == [4]  # one update of its own per round, on the round's global model
    assert np.abs(arrays["w"].numpy() - 0.1).max() < 0.02  # where the honest updates lead
    assert arrays["w"].numpy().dtype == np.float32 and int(arrays["batches"].numpy()) == 3
    honest = [metrics[f"trust-node-{n}"] for n in range(2, 6)]
    assert min(honest) > 0.9  # they point where the server's update points
    liar = metrics["trust-node-1"]
    assert liar == 0.0 if attack == "sign" else liar > 0.9  # scaled: same way, cut to size


def test_synthetic_trust_keeps_the_model_and_says_so_when_no_silo_agrees(task_identity, caplog):
    """Every silo's update points away from the server's (as when the synthetic set is far from
    the silos' data): all trust 0, the model stays as sent, and the log says why."""
    from deploy.inprocess import InProcessGrid

    cfg = RunConfig.from_flower({"strategy": "fgl", "aggregation": "synthetic-trust"})
    away = lambda _, arrays: ArrayRecord({"w": torch.full((64,), -0.1),  # noqa: E731
                                          "batches": torch.tensor(0)})  # fmt: skip
    strategy = build_strategy(cfg, server_update_fn=away)
    sent = ArrayRecord({"w": torch.from_numpy(GLOBAL), "batches": torch.tensor(0)})
    grid = InProcessGrid({n: None for n in range(1, 6)})
    list(strategy.configure_train(1, sent, ConfigRecord(), grid))
    got = replies(scale=1.0)
    for node, reply in enumerate(got, start=1):
        reply.metadata.__dict__["_src_node_id"] = node
    arrays, metrics = strategy.aggregate_train(1, got)
    assert all(metrics[f"trust-node-{n}"] == 0.0 for n in range(1, 6))
    assert np.array_equal(arrays["w"].numpy(), GLOBAL)
    assert "no silo's update agrees with the server's" in caplog.text


@pytest.mark.simulation
def test_an_fgl_run_trusts_by_its_synthetic_set_and_a_baseline_by_its_store(blood_npz, tmp_path):
    import json

    from tests.conftest import small_fgl_run

    config = {"dataset": str(blood_npz), "train-subset": 80, "eval-subset": 40,
              "generator": "offline-tiny", "cache-dir": str(tmp_path / "cache"),
              "aggregation": "synthetic-trust", "local-epochs": 1}  # fmt: skip
    results = small_fgl_run(config, tmp_path, "trusted", **{"num-server-rounds": 1})
    assert "server-update" in results["phase-seconds"]
    (round1,) = [r for r in results["rounds"] if r["round"] == 1]
    trust = {k: v for k, v in round1.items() if k.startswith("silo-trust-node-")}
    assert len(trust) == 2 and all(0.0 <= v <= 1.0 for v in trust.values())
    # a FedAvg baseline trusts by that run's store, named in trusted-store
    from deploy.inprocess import run_in_process

    baseline = {**config, "strategy": "fedavg", "min-nodes": 2, "num-server-rounds": 1,
                "trusted-store": results["synthesis"]["store"], "output-dir": str(tmp_path),
                "run-name": "baseline"}  # fmt: skip
    run_in_process(baseline, num_silos=2)
    trusted = json.loads((tmp_path / "baseline" / "results.json").read_text())
    assert trusted["trusted-store"]["images"] == sum(results["synthesis"]["images-per-class"])
    (round1,) = [r for r in trusted["rounds"] if r["round"] == 1]
    assert len([k for k in round1 if k.startswith("silo-trust-node-")]) == 2
    with pytest.raises(ConfigError, match=r"trusted-store '.*nowhere': .*no readable manifest"):
        run_in_process({**baseline, "trusted-store": str(tmp_path / "nowhere")}, num_silos=2)


def test_synthetic_trust_needs_a_synthetic_set(task_identity):
    with pytest.raises(ConfigError, match="'synthetic-trust' trains the server's trusted update"):
        RunConfig.from_flower({"strategy": "fedavg", "aggregation": "synthetic-trust"})
    with pytest.raises(ConfigError, match="an FGL run trusts its own set"):
        RunConfig.from_flower({"strategy": "fgl", "aggregation": "synthetic-trust",
                               "trusted-store": "outputs/store"})  # fmt: skip


def test_the_config_refuses_what_a_robust_rule_cannot_do():
    with pytest.raises(ConfigError, match="not supported with strategy = 'fedopt'"):
        RunConfig.from_flower({"strategy": "fedopt", "aggregation": "median"})
    with pytest.raises(ConfigError, match=r"krum.* against 2 lying silo\(s\).* needs at least 7"):
        RunConfig.from_flower({"aggregation": "krum", "aggregation-malicious": 2, "min-nodes": 5})
    with pytest.raises(ConfigError, match="aggregation-select = 5 averages more replies"):
        RunConfig.from_flower({"aggregation": "multi-krum", "aggregation-select": 5,
                               "min-nodes": 5})  # fmt: skip
    with pytest.raises(ConfigError, match="trimmed-beta"):
        RunConfig.from_flower({"aggregation": "trimmed-mean", "trimmed-beta": 0.5})


# --- in a run: the attack harness (benchmarks.attacks) against FedAvg and the median ----------


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """FedAvg on digits, 5 silos, 3 rounds of 5 local epochs: clean; with silo 1 scaling its
    update by 100; the same attack against the median."""
    import json

    from benchmarks.attacks import UpdateAttack
    from deploy.inprocess import run_in_process

    tmp = tmp_path_factory.mktemp("attacks")
    base = {"dataset": "digits", "num-server-rounds": 3, "local-epochs": 5, "min-nodes": 5,
            "fraction-evaluate": 0.0, "output-dir": str(tmp)}  # fmt: skip

    def run(name: str, attack=None, **keys) -> float:
        run_in_process({**base, **keys, "run-name": name}, 5,
                       on_reply=attack or (lambda reply, _: reply))  # fmt: skip
        results = json.loads((tmp / name / "results.json").read_text())
        return results["summary"]["final-test-accuracy"]

    return {
        "clean": run("clean"),
        "fedavg": run("fedavg", UpdateAttack("scale", {1})),
        "median": run("median", UpdateAttack("scale", {1}), aggregation="median"),
    }


@pytest.mark.simulation
def test_one_silo_of_five_scaling_by_100_breaks_fedavg_and_not_the_median(digits_runs):
    assert digits_runs["clean"] > 0.4  # 3 short rounds on non-IID silos (0.53 here)
    assert digits_runs["fedavg"] < digits_runs["clean"] - 0.3  # the liar decides the model
    assert digits_runs["median"] > digits_runs["clean"] - 0.1


def test_the_data_attacks_poison_a_silos_own_file(blood_npz, tmp_path):
    from benchmarks.attacks import backdoor_success, poisoned_data, with_trigger
    from fgl_core.datasets import ImageSet, load_dataset

    data = load_dataset(RunConfig.from_flower({"dataset": str(blood_npz), "train-subset": 80,
                                               "eval-subset": 40}))  # fmt: skip
    names = data.class_names
    flipped = np.load(poisoned_data(data.train, data.test, names, "label-flip", tmp_path / "f.npz"))
    assert (flipped["train_labels"] == (data.train.labels + 1) % len(names)).all()
    backdoor = np.load(poisoned_data(data.train, data.test, names, "backdoor", tmp_path / "b.npz",
                                     target=3, share=0.5))  # fmt: skip
    stamped = (backdoor["train_images"][:, -5:-1, -5:-1] == 255).all(axis=(1, 2, 3))
    assert stamped.sum() == 40 and (backdoor["train_labels"][stamped] == 3).all()
    test = ImageSet(data.test.images, data.test.labels)
    spotted = lambda images: np.where((images[:, -5:-1, -5:-1] == 255).all(axis=(1, 2, 3)), 3, 0)  # noqa: E731
    assert backdoor_success(spotted, test, target=3) == 1.0  # a model that learned the trigger
    assert backdoor_success(lambda images: np.zeros(len(images)), test, target=3) == 0.0
    assert (with_trigger(test.images)[:, -5:-1, -5:-1] == 255).all()
