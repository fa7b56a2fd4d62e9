"""Adapting the generator in a run (`generator-adaptation = "lora"`): the `query.adapt` rounds
of two silos in one process, under DP-SGD, interrupted after the first round and resumed, then
learned class embeddings against the adapted generator; the adapter's files loaded by diffusers'
own `load_lora_weights`; the synthetic store keyed by the adapter; the server's refusal of an
adapter that is not one, and of a learned embedding beyond its bound; the config's checks.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fgl_core.adapted_generator import (
    LORA_FILE,
    adapter_settings,
    apply_adapter,
    load_pipeline,
    load_state,
    prepare,
    state_digest,
    state_of,
)
from fgl_core.adapters import epsilon_after, sample_rate
from fgl_core.config import ConfigError, RunConfig
from fgl_core.mini import weights_dir
from fgl_core.payload import ADAPT_MESSAGE_TYPE
from fgl_server import adaptation
from fgl_server.adaptation import check_reply
from tests.conftest import small_fgl_run

ROUNDS, STEPS, BATCH, NOISE = 2, 2, 16, 1.0


def base(blood_npz, cache) -> dict:
    return {
        "dataset": str(blood_npz),
        "train-subset": 160,
        "eval-subset": 40,
        "cache-dir": str(cache),
        "generator-adaptation": "lora",
        "adaptation-rounds": ROUNDS,
        "adaptation-steps": STEPS,
        "adaptation-batch-size": BATCH,
        "adaptation-rank": 2,
        "adapt-decoder": True,
        "adaptation-noise": NOISE,
        "prompt-mode": "learned",  # against the adapted generator: the adapter goes with round 0
        "learned-steps": 2,
    }


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def resumed(blood_npz, tmp_path_factory):
    """A private adaptation run that dies in round 2, then the same run again, which goes on
    from the checkpoint of round 1 to the end."""
    tmp = tmp_path_factory.mktemp("adapt")
    config = base(blood_npz, tmp / "cache")
    real_round = adaptation.adaptation_round

    def dies_in_round_two(grid, state, server_round, cfg):
        if server_round == 2:
            raise Crash("the server died in adaptation round 2")
        return real_round(grid, state, server_round, cfg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adaptation, "adaptation_round", dies_in_round_two)
        with pytest.raises(Crash):
            small_fgl_run(config, tmp, "private")
    first = json.loads((tmp / "private" / "results.json").read_text())
    results = small_fgl_run(config, tmp, "private")
    return tmp, config, first, results


def test_a_crash_in_round_two_costs_one_round_and_the_resumed_run_finishes(resumed):
    tmp, _, first, results = resumed
    assert [r["round"] for r in first["adaptation"]["rounds"]] == [1]
    assert (tmp / "private" / "checkpoint-adapt.pt").is_file()
    adapt = [e for e in results["traffic"]["exchanges"] if e["message-type"] == ADAPT_MESSAGE_TYPE]
    assert sorted((e["round"], e["node-id"]) for e in adapt) == [(2, 1), (2, 2)]  # not round 1
    assert [r["round"] for r in results["adaptation"]["rounds"]] == [1, 2]
    embed = [e for e in results["traffic"]["exchanges"] if e["message-type"] == "query.embed"]
    assert embed and {e["round"] for e in embed} == {0}
    # learned embeddings: each silo got the federation's adapter with the request, and learned
    assert all(e["bytes-sent"] > results["adaptation"]["adapter-bytes"] for e in embed)
    moved = results["embedding"]["learned-distance-per-node"]
    assert set(moved) == {"node 1", "node 2"}
    assert all(0 < m["median"] <= m["max"] < 1.0 for m in moved.values())
    # what travels each way is the adapter: the UNet's B factors and the decoder's weights
    adapter_bytes = results["adaptation"]["adapter-bytes"]
    assert all(adapter_bytes < e["bytes-sent"] < adapter_bytes * 1.05 for e in adapt)
    assert all(adapter_bytes < e["bytes-received"] < adapter_bytes * 1.05 for e in adapt)
    assert results["synthesis"]["made"] > 0 and "test-accuracy" in results["one-shot"]


def test_each_silos_epsilon_covers_every_adaptation_round(resumed):
    _, _, _, results = resumed
    dp = results["adaptation"]["dp"]
    assert dp["noise-multiplier"] == NOISE and dp["delta"] == 1e-5
    last = results["adaptation"]["rounds"][-1]["silos"]
    assert set(dp["epsilon-per-silo"]) == set(last) == {"1", "2"}
    for node, silo in last.items():
        rate = sample_rate(silo["num-examples"], BATCH)  # Opacus': 1 / batches per epoch
        # two parts (UNet, decoder) read the images in each of the two rounds
        expected = epsilon_after([(NOISE, rate, STEPS * ROUNDS)] * 2, 1e-5)
        one_round = epsilon_after([(NOISE, rate, STEPS)] * 2, 1e-5)
        assert dp["epsilon-per-silo"][node] == pytest.approx(expected, rel=1e-9)
        assert expected > one_round > 0
        first = results["adaptation"]["rounds"][0]["silos"][node]["epsilon"]
        assert first == pytest.approx(one_round, rel=1e-9)


def test_the_run_states_each_silos_budget_and_what_it_does_not_cover(resumed):
    """results.json's `privacy`: each silo's adaptation epsilon, rebuilt by the server from the
    rounds it took part in, is the one the silo reported; nothing else here was noised, and
    what no guarantee covers is named."""
    _, _, _, results = resumed
    privacy = results["privacy"]
    reported = results["adaptation"]["dp"]["epsilon-per-silo"]
    assert set(privacy["silos"]) == {f"node {n}" for n in reported}
    for node, epsilon in reported.items():
        budget = privacy["silos"][f"node {node}"]
        assert budget["delta"] == 1e-5 and set(budget["parts"]) == {"adaptation"}
        assert budget["parts"]["adaptation"] == pytest.approx(epsilon, rel=1e-3)
        assert budget["epsilon"] == budget["parts"]["adaptation"]
    assert "the learned-level embeddings, sent without noise" in privacy["not-covered"]
    assert "the label histogram, sent in the clear" in privacy["not-covered"]


def test_the_adapter_loads_through_diffusers_and_keys_the_synthetic_store(resumed):
    tmp, config, _, results = resumed
    folder = tmp / "private" / "adapter"
    assert (folder / LORA_FILE).is_file() and (folder / "decoder.safetensors").is_file()
    checkpoint = torch.load(tmp / "private" / "checkpoint-adapt.pt", weights_only=True)
    state = {k: v.numpy() for k, v in checkpoint["model"].items()}
    assert state_digest(state) == results["adaptation"]["adapter-digest"]

    settings = adapter_settings(RunConfig.from_flower({**config, "strategy": "fgl"}))
    ref = str(weights_dir())
    trained = load_pipeline(ref, torch.device("cpu"))
    prepare(trained, settings)
    load_state(trained, state)
    assert state_digest(state_of(trained, True)) == results["adaptation"]["adapter-digest"]
    fresh = load_pipeline(ref, torch.device("cpu"))
    apply_adapter(fresh, folder)  # diffusers' load_lora_weights, fused
    stock = load_pipeline(ref, torch.device("cpu"))
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 700])
    with torch.no_grad():
        want = trained.unet(sample, t, encoder_hidden_states=cond).sample
        got = fresh.unet(sample, t, encoder_hidden_states=cond).sample
        before = stock.unet(sample, t, encoder_hidden_states=cond).sample
        decoded = fresh.vae.decode(sample).sample
        decoded_want = trained.vae.decode(sample).sample
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, before, atol=1e-4)
    assert torch.allclose(decoded, decoded_want, atol=1e-6)

    store = results["synthesis"]["store"]
    manifest = json.loads((tmp / "cache" / "synthetic" / store.split("/")[-1] /
                           "manifest.json").read_text())  # fmt: skip
    assert manifest["adapter-digest"] == results["adaptation"]["adapter-digest"]
    # the same run without adaptation plans the same images but may not use this store
    plain = {k: v for k, v in config.items() if not k.startswith(("adapt", "generator-adapt"))}
    again = small_fgl_run(plain, tmp, "plain")
    assert again["synthesis"]["store"] != store and again["synthesis"]["reused"] == 0


def reply(arrays: dict[str, np.ndarray] | None, examples=100, error: str = "") -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                      message_type=ADAPT_MESSAGE_TYPE)  # fmt: skip
    if error:
        return Message(Error(code=0, reason=error), reply_to=request)
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
    return Message(content, reply_to=request)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: {**s, "unet/extra": np.zeros(3, np.float32)}, "'unet/extra': ((3,), 'float32')"),
        (lambda s: {k: v for k, v in list(s.items())[1:]}, "missing"),
        (lambda s: {k: v.astype(np.float64) for k, v in s.items()}, "float64"),
        (lambda s: {k: v[..., :1].copy() for k, v in s.items()}, "((2, 1), 'float32')"),
        (lambda s: {k: np.full_like(v, np.nan) for k, v in s.items()}, "not finite"),
        (lambda s: None, "no adapter"),
    ],
)
def test_the_server_refuses_a_reply_that_is_not_the_adapter_by_name(task_identity, change, problem):
    expected = {"unet/a.lora_B.fgl.weight": np.zeros((4, 2), np.float32),
                "decoder/conv.weight": np.ones((2, 2), np.float32)}  # fmt: skip
    why, _, _, _ = check_reply(reply(change(expected)), expected)
    assert problem in why
    assert check_reply(reply(expected), expected)[0] == ""
    assert "positive integer" in check_reply(reply(expected, examples=-5), expected)[0]
    assert "error reply: boom" in check_reply(reply(None, error="boom"), expected)[0]


def test_the_config_refuses_adaptation_where_it_cannot_run():
    with pytest.raises(ConfigError, match="strategy = 'fedavg' synthesizes nothing"):
        RunConfig.from_flower({"generator-adaptation": "lora"})
    with pytest.raises(ConfigError, match="domain-prompts is not supported yet"):
        RunConfig.from_flower({"strategy": "fgl", "generator-adaptation": "lora",
                               "domain-prompts": "domainnet"})  # fmt: skip
    cfg = RunConfig.from_flower({"strategy": "fgl", "generator-adaptation": "lora"})
    assert cfg.adaptation_layers == "attention+conv" and not cfg.adapt_decoder


def test_a_learned_embedding_passes_within_its_bound_and_is_refused_beyond_it_by_name():
    from fgl_core.payload import EmbeddingPayload
    from fgl_server.validation import PayloadLimits, PayloadRejected, validate_payload

    rng = np.random.default_rng(0)
    prompts = rng.standard_normal((1, 2, 77, 8)).astype(np.float32)  # the server's encodings
    probe = rng.standard_normal((77, 8)).astype(np.float32)
    limits = PayloadLimits(width=8, num_classes=2, probe=probe, class_prompts=prompts,
                           class_names=("basophil", "eosinophil"),
                           learned_max_distance=0.5)  # fmt: skip

    def payload(moved: float) -> EmbeddingPayload:
        direction = rng.standard_normal((2, 77, 8))
        direction /= np.linalg.norm(direction.reshape(2, -1), axis=1)[:, None, None]
        norms = np.linalg.norm(prompts[0].reshape(2, -1), axis=1)[:, None, None]
        return EmbeddingPayload(
            embeds=(prompts[0] + moved * norms * direction).astype(np.float16),
            labels=np.arange(2), weights=np.ones(2, np.int64), domains=np.zeros(2, np.int64),
            probe=probe.astype(np.float16), label_histogram=[3, 4],
        )  # fmt: skip

    validate_payload("node 1", payload(0.45), limits)  # learned, within the bound
    with pytest.raises(PayloadRejected, match=r"node 1: .*class 0 \('basophil'\).*learned within"
                       r" its bound.*off by 0\.6.*learned-max-distance 0\.5"):  # fmt: skip
        validate_payload("node 1", payload(0.6), limits)
    exact = dataclasses.replace(limits, learned_max_distance=None)  # a class-level run
    with pytest.raises(PayloadRejected, match=r"tolerance 0\.02"):
        validate_payload("node 1", payload(0.45), exact)


def test_the_config_refuses_learned_embeddings_with_what_they_cannot_be_checked_with():
    with pytest.raises(ConfigError, match="does not support embedding-clip"):
        RunConfig.from_flower({"prompt-mode": "learned", "embedding-clip": 1.0})
    with pytest.raises(ConfigError, match="secure-histograms"):
        RunConfig.from_flower({"prompt-mode": "learned", "secure-histograms": True})
    assert RunConfig.from_flower({"prompt-mode": "learned"}).effective_prompt_template == (
        "{label}, real world images, high resolution"
    )


def test_at_instance_level_a_silo_adapts_on_the_prompts_it_sends(blood_npz, tmp_path):
    """The images a silo captions for round 0 are conditioned on their own prompts, the same
    texts it sends; the others on their class's prompt."""
    from fgl_client.adaptation import conditioning
    from fgl_client.embedding import captioner, silo_prompts
    from fgl_client.silo import load_silo
    from fgl_core.adapted_generator import encode_texts
    from fgl_core.payload import EmbedRequest
    from fgl_core.pretrained import resolve_model_ref
    from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt

    cache = str(tmp_path)
    cfg = RunConfig.from_flower({"strategy": "fgl", "dataset": str(blood_npz),
                                 "train-subset": 120, "prompt-mode": "instance",
                                 "max-captions-per-class": 2, "generator": "offline-tiny",
                                 "captioner": "offline-tiny", "cache-dir": cache,
                                 "generator-adaptation": "lora"})  # fmt: skip
    silo = load_silo(cfg, {"partition-id": 0, "num-partitions": 2})
    pipe = load_pipeline(resolve_model_ref("offline-tiny", "generator", cache), torch.device("cpu"))
    rows = conditioning(pipe, silo, cfg)
    sent = silo_prompts(EmbedRequest.from_config(cfg), silo,
                        lambda: captioner("offline-tiny", cache, "cpu"))  # fmt: skip
    captioned = np.asarray(sent.images)
    assert len(rows) == len(silo.train) and 0 < len(captioned) < len(silo.train)
    assert torch.allclose(rows[captioned], encode_texts(pipe, sent.texts))
    rest = np.setdiff1d(np.arange(len(silo.train)), captioned)
    names = [class_prompt(PAPER_TEMPLATE, silo.class_names[int(c)])
             for c in silo.train.labels[rest]]  # fmt: skip
    assert torch.allclose(rows[rest], encode_texts(pipe, names))
    own_class = encode_texts(pipe, [class_prompt(PAPER_TEMPLATE, silo.class_names[int(c)])
                                    for c in silo.train.labels[captioned]])  # fmt: skip
    assert not torch.allclose(rows[captioned], own_class)  # the captions are in them


def test_the_privacy_report_covers_the_adapters_and_relearns_what_the_silos_sent(resumed):
    """The report states each silo's epsilon for the adapters, and learns each silo's class
    embeddings again as the silo did (its seeds, the run's adapter): they moved as far from the
    templates as the embeddings the server received."""
    from fgl_client.embedding import text_encoder
    from fgl_privacy.report import learned_embeddings, read_results, report, run_silos

    tmp, _, _, results = resumed
    run = tmp / "private"
    text = report(run, multipliers=(0.0,), per_silo=1, modes=()).read_text()
    assert f"In {ROUNDS} adaptation rounds the server received each silo's adapter" in text
    for node, epsilon in results["adaptation"]["dp"]["epsilon-per-silo"].items():
        assert f"| {node} | {epsilon:.3g} |" in text
    figures = json.loads((run / "privacy_report.json").read_text())
    (learned,) = [row for row in figures["inversion"] if row["mode"] == "learned"]
    assert learned["prompts"] == 2 and "| learned level | 0 | none |" in text
    _, cfg = read_results(run)  # every class of each silo, as the silos learned them
    encoder = text_encoder(cfg.generator, cfg.cache_dir, "cpu")
    moved = learned_embeddings(cfg, run_silos(results, cfg), 8, run, encoder)[2]
    received = results["embedding"]["learned-distance-per-node"].values()
    assert min(moved) > 0
    assert sorted(moved) == pytest.approx(sorted(d["median"] for d in received), abs=2e-3)
