"""Central DP in the training rounds (`round-dp`): Flower's client-side clipping wrappers and
mods, the server's check that each silo clipped, each silo's noise against its weight in the
mean, and one budget per silo composed by dp-accounting, checked against the analytic Gaussian.
In a run: the silos' mod clips every update, a silo that sends its update unclipped is left
out, and results.json's `privacy` states each silo's rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fgl_core.config import ConfigError, RunConfig
from fgl_server.budget import privacy_budget
from strategies.build import build_strategy
from tests.test_privacy import analytic_delta

SIZE = 64


def sent_arrays() -> ArrayRecord:
    return ArrayRecord({"w": torch.zeros(SIZE)})


def replies(norms: list[float], weights: list[int]) -> list[Message]:
    """Silo k's reply (node k + 1): the global model (zeros) plus an update of norm `norms[k]`,
    weighted by `weights[k]` examples; its norm bit says whether it was clipped at 1."""
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                      message_type="train")  # fmt: skip
    out = []
    for node, (norm, weight) in enumerate(zip(norms, weights, strict=True), start=1):
        update = np.full(SIZE, norm / SIZE**0.5, np.float32)
        metrics = MetricRecord({"num-examples": weight, "norm_bit": int(norm >= 1.0)})
        reply = Message(RecordDict({"arrays": ArrayRecord({"w": torch.from_numpy(update)}),
                                    "metrics": metrics}), reply_to=request)  # fmt: skip
        reply.metadata.__dict__["_src_node_id"] = node
        out.append(reply)
    return out


def private(**keys):
    from deploy.inprocess import InProcessGrid

    cfg = RunConfig.from_flower({"round-dp": "client-fixed", "min-nodes": 5, **keys})
    strategy = build_strategy(cfg)
    grid = InProcessGrid({n: None for n in range(1, 6)})
    messages = list(strategy.configure_train(1, sent_arrays(), ConfigRecord(), grid))
    return strategy, messages


def test_the_server_asks_for_the_clip_leaves_out_an_unclipped_silo_and_records_each_noise(
    task_identity,
):
    strategy, messages = private(**{"round-dp-noise": 0.5, "round-dp-clip": 1.0})
    asked = [{k: v for k, v in m.content["config"].items() if "clip" in k} for m in messages]
    assert len(messages) == 5 and all(list(a.values()) == [1.0] for a in asked)  # the clip
    weights = [100, 100, 100, 100, 400]
    arrays, metrics = strategy.aggregate_train(1, replies([50.0, 1.0, 0.5, 0.5, 0.5], weights))
    # node 1 did not clip: its update of norm 50 is not in the mean
    assert "dp-noise-node-1" not in metrics and metrics["dp-clip"] == 1.0
    # the noise's deviation z C / n = 0.1 against how far each silo moves the mean, C w / sum w
    assert metrics["dp-noise-node-2"] == pytest.approx(0.1 / (100 / 700))  # 0.7
    assert metrics["dp-noise-node-5"] == pytest.approx(0.1 / (400 / 700))  # a heavier silo: 0.175
    assert np.linalg.norm(arrays["w"].numpy()) < 3.0  # the liar's would have moved it 6.25


def test_adaptive_clipping_records_the_clipped_counts_noise_and_noises_at_the_moved_clip(
    task_identity,
):
    strategy, _ = private(**{"round-dp": "client-adaptive", "round-dp-noise": 0.5,
                             "round-dp-clip": 1.0})  # fmt: skip
    _, metrics = strategy.aggregate_train(1, replies([1.0] * 5, [100] * 5))
    dp = strategy.strategy
    assert dp.clipping_norm < 1.0  # every silo clipped: the clip moves down toward the median
    assert metrics["dp-count-noise"] == 0.5  # max(n / 20, z): z must stay below twice it
    # Andrew et al.: the update's multiplier is raised so that with the count it composes to z
    update = (0.5**-2 - (2 * 0.5) ** -2) ** -0.5
    assert metrics["dp-noise-node-3"] == pytest.approx(update * dp.clipping_norm / 5 * 5 / 1.0)


def test_fgl_fine_tunes_the_noised_mean(task_identity):
    from deploy.inprocess import InProcessGrid

    seen = []

    def finetune(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        seen.append(arrays["w"].numpy().copy())
        return ArrayRecord({"w": torch.ones(SIZE)})

    cfg = RunConfig.from_flower({"strategy": "fgl", "round-dp": "client-fixed", "min-nodes": 5,
                                 "round-dp-noise": 1.0})  # fmt: skip
    strategy = build_strategy(cfg, finetune_fn=finetune)
    grid = InProcessGrid({n: None for n in range(1, 6)})
    list(strategy.configure_train(1, sent_arrays(), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, replies([0.0] * 5, [100] * 5))
    assert len(seen) == 1 and seen[0].std() > 0.05  # no update, so what it got is the noise
    assert (arrays["w"].numpy() == 1.0).all()  # and what the round ends with is its fine-tune


def test_a_silos_rounds_compose_as_the_analytic_gaussian():
    """k Gaussian releases of multiplier z are one of z / sqrt(k): Balle and Wang's formula."""
    rows = [{"round": r, "silo-dp-noise-node-10": 2.0, "silo-dp-noise-node-4": 4.0}
            for r in (1, 2, 3, 4)]  # fmt: skip
    cfg = RunConfig.from_flower({"round-dp": "client-fixed", "num-server-rounds": 4})
    budget = privacy_budget(cfg, {"rounds": rows})
    assert list(budget["silos"]) == ["node 4", "node 10"]  # in the nodes' order, not the text's
    for node, z in (("node 10", 2.0), ("node 4", 4.0)):
        silo = budget["silos"][node]
        assert silo["epsilon"] == silo["parts"]["rounds"]
        assert analytic_delta(silo["epsilon"], z / 2) == pytest.approx(1e-5, rel=2e-3)
    assert budget["not-covered"] == []  # a baseline under round-dp: nothing left in the clear
    without = privacy_budget(RunConfig.from_flower({"num-server-rounds": 4}), {"rounds": []})
    assert without["silos"] == {}
    assert without["not-covered"] == ["the training rounds' updates (round-dp = 'none')"]


def test_the_config_refuses_round_dp_where_its_accounting_would_not_hold():
    with pytest.raises(ConfigError, match="round-dp is not supported with strategy = 'fedopt'"):
        RunConfig.from_flower({"strategy": "fedopt", "round-dp": "client-fixed"})
    with pytest.raises(ConfigError, match="round-dp with aggregation = 'median'"):
        RunConfig.from_flower({"round-dp": "client-adaptive", "aggregation": "median"})
    with pytest.raises(ConfigError, match="round-dp-noise"):
        RunConfig.from_flower({"round-dp": "client-fixed", "round-dp-noise": 0.0})


@pytest.mark.simulation
@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_in_a_run_every_update_is_clipped_a_silo_that_does_not_is_left_out_and_budgeted(
    tmp_path, mode
):
    """FedAvg on digits, 5 silos, 2 rounds: the silos' mod clips each update (to 0.5 at
    first); silo 1 multiplies its clipped update by 100 after the mod (as a silo that skipped
    it would). Each silo's epsilon is the analytic Gaussian's for its releases composed: k
    Gaussians of multipliers z_j are one of multiplier (sum z_j^-2)^-1/2."""
    from benchmarks.attacks import UpdateAttack
    from deploy.inprocess import run_in_process
    from fgl_privacy.report import budget_section

    attack, norms = UpdateAttack("scale", {1}), {1: [], 2: []}

    def on_reply(reply: Message, message: Message) -> Message:
        if reply.metadata.message_type == "train" and not reply.has_error():
            sent, got = message.content["arrays"], reply.content["arrays"]
            server_round = int(message.content["config"]["server-round"])
            norms[server_round].append(np.sqrt(sum(
                float(((got[k].numpy() - sent[k].numpy()) ** 2).sum()) for k in got)))  # fmt: skip
        return attack(reply, message)

    config = {"dataset": "digits", "num-server-rounds": 2, "local-epochs": 1, "min-nodes": 5,
              "fraction-evaluate": 0.0, "round-dp": mode, "round-dp-clip": 0.5,
              "round-dp-noise": 0.8, "output-dir": str(tmp_path), "run-name": "dp"}  # fmt: skip
    run_in_process(config, 5, on_reply=on_reply)
    results = json.loads((tmp_path / "dp" / "results.json").read_text())
    rounds = [r for r in results["rounds"] if r["round"] >= 1]
    clips = [r["silo-dp-clip"] for r in rounds]
    assert clips[0] == 0.5 and (clips[1] == 0.5) == (mode == "client-fixed")  # adaptive moves
    for server_round, clip in zip((1, 2), clips, strict=True):  # the mod clipped every update
        assert len(norms[server_round]) == 5 and max(norms[server_round]) <= clip * (1 + 1e-4)
    assert all("silo-dp-noise-node-1" not in r for r in rounds)  # the liar, left out each round
    privacy = results["privacy"]
    assert sorted(privacy["silos"]) == ["node 2", "node 3", "node 4", "node 5"]
    count = [r.get("silo-dp-count-noise") for r in rounds]
    assert (count == [None, None]) == (mode == "client-fixed")
    for node, silo in privacy["silos"].items():
        releases = [r[f"silo-dp-noise-node-{node.split()[-1]}"] for r in rounds]
        releases += [c for c in count if c is not None]
        assert min(releases) > 0.8 / 5 * 0.5  # the noise against a silo's share of the mean
        combined = sum(z**-2 for z in releases) ** -0.5
        assert analytic_delta(silo["epsilon"], combined) == pytest.approx(1e-5, rel=2e-3)
    assert privacy["not-covered"] == []
    table = budget_section(results)
    assert "| silo | delta | rounds | whole run |" in table
    node2 = next(line for line in table if line.startswith("| node 2 |"))
    assert node2.endswith(f"| {privacy['silos']['node 2']['epsilon']:.3g} |")


def test_the_noise_is_calibrated_to_the_silos_a_round_samples():
    cfg = RunConfig.from_flower({"round-dp": "client-fixed", "min-nodes": 10,
                                 "fraction-train": 0.3})  # fmt: skip
    assert build_strategy(cfg).strategy.num_sampled_clients == 3  # as FedAvg samples 10 x 0.3
