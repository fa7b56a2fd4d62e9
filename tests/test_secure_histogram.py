"""Label histograms by Flower's SecAgg+: the server gets their sum and no silo's own."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.inprocess import InProcessGrid, silo_context
from fgl_client.embedding import build_payload, text_encoder
from fgl_client.secure_histogram import HistogramClient
from fgl_client.silo import load_silo
from fgl_core.config import ConfigError, RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.payload import SECAGG_RECORD, EmbedRequest
from fgl_server.fgl_run import run_fgl
from fgl_server.ledger import RecordingGrid
from fgl_server.results import RunRecorder
from fgl_server.secure_histogram import secure_histogram_sum, sum_problem
from fgl_server.synthesis_plan import merge_payloads, plan_images
from fgl_server.validation import PayloadLimits, PayloadRejected, validate_payload
from tests.conftest import launch

SILOS = 3


def secure_config(tmp_path, **overrides) -> dict:
    return {
        "strategy": "fgl",
        "generator": "offline-tiny",
        "dataset": "digits",
        "alpha": 0.3,  # skewed silos: their histograms differ from each other and from the sum
        "secure-histograms": True,
        "synthesis-plan": "proportional",
        "max-silo-share": 1.0,  # a proportional plan from the sum: no per-silo cap
        "images-per-class": 4,
        "steps": 2,
        "oneshot-epochs": 1,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "min-nodes": SILOS,
        "output-dir": str(tmp_path),
        "cache-dir": str(tmp_path / "cache"),
        "run-name": "secure",
        **overrides,
    }


def silo_histograms(run_config: dict) -> list[list[int]]:
    cfg = RunConfig.from_flower(run_config)
    return [
        load_silo(cfg, {"partition-id": i, "num-partitions": SILOS}).train.label_histogram(10)
        for i in range(SILOS)
    ]


@pytest.mark.simulation
def test_a_simulation_sums_the_histograms_by_secagg_plus_and_reveals_none(tmp_path):
    run_config = secure_config(tmp_path)
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    proc = launch(["--simulation", str(SILOS), "--quiet", "--run-config", overrides], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "secure" / "results.json").read_text())

    histograms = silo_histograms(run_config)
    plain_sum = [sum(counts) for counts in zip(*histograms, strict=True)]
    assert len({tuple(h) for h in histograms}) == SILOS  # three different silos
    assert results["synthesis"]["merged-label-histogram"] == plain_sum
    secure = results["secure-histograms"]
    assert len(secure["nodes"]) == SILOS and secure["failures"] == 0
    assert secure["messages"] == 4 * SILOS  # SecAgg+'s four stages, one message per silo each
    assert secure["bytes-sent"] > 0 and secure["bytes-received"] > 0
    # no histogram, in any form the server records: every silo sent every class's prompt and
    # its train replies describe the silo without one
    assert set(results["embedding"]["embeddings-per-node"].values()) == {10}
    silos = results["traffic"]["silos"]
    assert len(silos) == SILOS and not any("label-histogram" in s for s in silos.values())
    text = json.dumps(results)
    for histogram in histograms:
        assert json.dumps(histogram) not in text


def test_secure_histograms_need_class_prompts_and_no_per_silo_cap():
    with pytest.raises(ConfigError, match="secure-histograms needs prompt-mode = 'class'"):
        RunConfig.from_flower({"secure-histograms": True, "prompt-mode": "instance"})
    proportional = {"secure-histograms": True, "synthesis-plan": "proportional"}
    with pytest.raises(ConfigError, match="max-silo-share < 1 needs each silo's histogram"):
        RunConfig.from_flower(proportional)  # the default cap, 0.5, cannot apply
    assert RunConfig.from_flower({**proportional, "max-silo-share": 1.0}).max_silo_share == 1.0
    # the balanced plan (the default) takes no claim, so the default cap stands beside it
    assert RunConfig.from_flower({"secure-histograms": True}).max_silo_share == 0.5


@pytest.fixture(scope="module")
def secure_payload(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    run_config = secure_config(tmp, alpha=0.05)
    cfg = RunConfig.from_flower(run_config)
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": SILOS})
    encoder = text_encoder("offline-tiny", cfg.cache_dir, "cpu")
    return silo, encoder, build_payload(EmbedRequest.from_config(cfg), silo, encoder)


def test_a_silo_sends_every_class_and_no_histogram(secure_payload):
    silo, encoder, payload = secure_payload
    held = [c for c, n in enumerate(silo.train.label_histogram(10)) if n > 0]
    assert len(held) < 10  # alpha 0.05: this silo lacks classes, and its prompts do not say so
    assert payload.labels.tolist() == list(range(10)) and payload.label_histogram == []
    limits = PayloadLimits(
        width=encoder.width, num_classes=10, probe=payload.probe.astype(np.float32)
    )
    with pytest.raises(PayloadRejected, match="label histogram of 0 classes"):
        validate_payload("node 1", payload, limits)  # a plain run needs the histogram
    secure = PayloadLimits(**{**limits.__dict__, "secure_histograms": True})
    validate_payload("node 1", payload, secure)
    leaky = dataclasses.replace(payload, label_histogram=[1] * 10)
    with pytest.raises(PayloadRejected, match="sent its label histogram in the clear"):
        validate_payload("node 1", leaky, secure)
    counted = dataclasses.replace(payload, weights=payload.weights * 7)
    with pytest.raises(PayloadRejected, match="with secure-histograms every weight is 1"):
        validate_payload("node 1", counted, secure)
    # what the secure sum must add up to: the silo says how many images it holds
    assert payload.num_train == len(silo.train)
    for claim in (-1, 0, 2**20 * 10 + 1):
        silent = dataclasses.replace(payload, num_train=claim)
        with pytest.raises(PayloadRejected, match=f"says it holds {claim} training images"):
            validate_payload("node 1", silent, secure)


def test_the_secure_sum_shares_the_proportional_plan_and_cannot_erase_a_balanced_class(
    secure_payload,
):
    _, _, payload = secure_payload
    histogram = [0, 5, 0, 3, 0, 0, 0, 0, 0, 2]
    prompts, merged = merge_payloads({1: payload}, 10, secure_histogram=histogram)
    assert merged == histogram and len(prompts) == 10
    jobs = plan_images(prompts, merged, 10, "proportional", run_seed=0, every_class=True)
    assert np.bincount([j.label for j in jobs], minlength=10).tolist() == [
        0, 15, 0, 9, 0, 0, 0, 0, 0, 6,
    ]  # fmt: skip
    # a silo's share of -5 for class 1 (another's count, +5 elsewhere to keep its num-train)
    lied = [0, 0, 0, 3, 0, 0, 5, 0, 0, 2]
    balanced = plan_images(prompts, lied, 4, "balanced", run_seed=0, every_class=True)
    assert np.bincount([j.label for j in balanced], minlength=10).tolist() == [4] * 10


# --- a silo that lies inside the exchange -------------------------------------------------


def in_process_sum(tmp_path, on_reply=lambda reply, _: reply, **overrides):
    """The secure sum over 3 in-process silos; with the silos' true histograms."""
    run_config = RunConfig.from_flower(secure_config(tmp_path, **overrides)).to_flower()
    contexts = {n: silo_context(run_config, n, n - 1, SILOS) for n in range(1, SILOS + 1)}
    histograms = silo_histograms(run_config)
    num_train = {n: sum(h) for n, h in zip(contexts, histograms, strict=True)}
    grid = InProcessGrid(contexts, on_reply)
    return secure_histogram_sum(grid, list(contexts), 10, 60.0, num_train), histograms


def lying_fit(monkeypatch, node: int, histogram=None, weight: int = 1):
    """Silo `node` hands SecAgg+ `histogram` (default: its own) with example count `weight`."""
    honest = HistogramClient.fit

    def fit(self, parameters, config):
        (own,), n, metrics = honest(self, parameters, config)
        if self.context.node_id != node:
            return [own], n, metrics
        return [np.asarray(own if histogram is None else histogram, np.float64)], weight, metrics

    monkeypatch.setattr(HistogramClient, "fit", fit)


def test_the_secure_sum_of_honest_silos_is_exact(tmp_path, task_identity):
    total, histograms = in_process_sum(tmp_path)
    assert total.histogram == [sum(c) for c in zip(*histograms, strict=True)]
    assert total.nodes == [1, 2, 3] and not total.problem and not total.rejected


@pytest.mark.parametrize(
    ("lie", "problem"),
    [
        ({"weight": 3}, "a silo sent a weight other than 1"),  # its counts count three times
        ({"histogram": [-500] + [0] * 9}, "not its own"),  # a negative count
        ({"histogram": [0] * 10, "weight": 10**6}, "weight other than 1"),
        ({"histogram": [10**6] + [0] * 9}, "not its own"),  # more than it said it holds
    ],
)
def test_a_secure_sum_that_does_not_add_up_is_refused_and_says_why(
    tmp_path, task_identity, monkeypatch, lie, problem
):
    lying_fit(monkeypatch, 2, **lie)
    total, _ = in_process_sum(tmp_path)
    assert total.histogram is None and problem in total.problem, total.problem


def masked_parts(reply: Message) -> list[np.ndarray]:
    return [bytes_to_array(b) for b in reply.content.config_records[SECAGG_RECORD]["masked_params"]]


def bytes_to_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("garble", "reason"),
    [
        (lambda parts: [parts[0], np.concatenate([parts[1], [7]])], "expected int[10]"),
        (lambda parts: [parts[0], np.full(10, np.nan)], "float64[10]; expected int[10]"),
        (lambda parts: [parts[0], parts[1] + 2**40], "outside [0, 4294967296)"),
        (lambda parts: parts[:1], "a list of 2 arrays"),
    ],
)
def test_a_malformed_masked_vector_drops_its_silo_by_name_and_the_others_are_summed(
    tmp_path, task_identity, garble, reason
):
    def garble_node_2(reply: Message, _: Message) -> Message:
        record = reply.content.config_records.get(SECAGG_RECORD)
        if reply.metadata.src_node_id == 2 and record and "masked_params" in record:
            record["masked_params"] = [array_bytes(a) for a in garble(masked_parts(reply))]
        return reply

    total, histograms = in_process_sum(tmp_path, garble_node_2)
    assert list(total.rejected) == [2] and reason in total.rejected[2]
    assert "node 2" in total.rejected[2]
    # Flower's dropout recovery: the other two silos' key shares remove node 2's masks
    assert total.nodes == [1, 3] and not total.problem
    assert total.histogram == [a + b for a, b in zip(histograms[0], histograms[2], strict=True)]


def test_a_run_goes_on_past_a_secure_sum_that_does_not_add_up(tmp_path, task_identity, monkeypatch):
    lying_fit(monkeypatch, 2, weight=3)
    cfg = RunConfig.from_flower(secure_config(tmp_path))
    contexts = {n: silo_context(cfg.to_flower(), n, n - 1, SILOS) for n in range(1, SILOS + 1)}
    recorder = RunRecorder(cfg)
    grid = RecordingGrid(InProcessGrid(contexts))
    model = run_fgl(grid, cfg, load_dataset(cfg), recorder, torch.device("cpu"))
    recorder.finish(model)
    results = json.loads((tmp_path / "secure" / "results.json").read_text())
    assert "weight other than 1" in results["secure-histograms"]["unusable"]
    # no histogram to trust: every class held, in equal shares; then the rounds as planned
    assert results["synthesis"]["merged-label-histogram"] == [1] * 10
    assert [r["round"] for r in results["rounds"]] == [0, 1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2**20), min_size=5, max_size=5), min_size=2, max_size=6),
    st.integers(0, 5),
    st.lists(st.integers(-(2**20), 2**20), min_size=5, max_size=5),
)
def test_the_sum_check_passes_every_honest_sum_and_refuses_any_lie_that_moves_the_total(
    histograms, liar, lie
):
    nodes = list(range(len(histograms)))
    said = {n: sum(h) for n, h in zip(nodes, histograms, strict=True)}
    total = np.sum(histograms, axis=0).astype(np.float64)
    assert sum_problem(total, 5, nodes, said) == ""
    shifted = total + np.asarray(lie, np.float64)  # one silo's share changed by `lie`
    problem = sum_problem(shifted, 5, nodes, said)
    if sum(lie) != 0 or (shifted < 0).any():
        assert problem, (lie, total)
    assert sum_problem(total + 0.5, 5, nodes, said) != ""  # not a sum of counts
    assert sum_problem(np.full(5, np.nan), 5, nodes, said) != ""
