"""Label histograms by Flower's SecAgg+: the server gets their sum and no silo's own."""

import json

import numpy as np
import pytest

from fgl_client.embedding import build_payload, text_encoder
from fgl_client.silo import load_silo
from fgl_core.config import ConfigError, RunConfig
from fgl_core.payload import EmbedRequest
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


@pytest.mark.slow
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
    with pytest.raises(ConfigError, match="max-silo-share < 1 needs each silo's histogram"):
        RunConfig.from_flower({"secure-histograms": True, "max-silo-share": 0.5})


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
    leaky = type(payload)(**{**payload.__dict__, "label_histogram": [1] * 10})
    with pytest.raises(PayloadRejected, match="sent its label histogram in the clear"):
        validate_payload("node 1", leaky, secure)
    counted = type(payload)(**{**payload.__dict__, "weights": payload.weights * 7})
    with pytest.raises(PayloadRejected, match="with secure-histograms every weight is 1"):
        validate_payload("node 1", counted, secure)


def test_the_plan_skips_classes_the_secure_sum_says_nobody_holds(secure_payload):
    _, _, payload = secure_payload
    histogram = [0, 5, 0, 3, 0, 0, 0, 0, 0, 2]
    prompts, merged = merge_payloads({"node 1": payload}, 10, secure_histogram=histogram)
    assert merged == histogram and len(prompts) == 10
    jobs = plan_images(prompts, merged, 10, "proportional", run_seed=0)
    assert np.bincount([j.label for j in jobs], minlength=10).tolist() == [
        0, 15, 0, 9, 0, 0, 0, 0, 0, 6,
    ]  # fmt: skip
    balanced = plan_images(prompts, merged, 4, "balanced", run_seed=0)
    assert sorted({j.label for j in balanced}) == [1, 3, 9]
