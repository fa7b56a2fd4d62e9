"""What the server can learn from a silo's embeddings, and the noise defence."""

import json

import numpy as np
import pytest
import torch

from fgl_client.text_encoding import TransformersTextEncoder
from fgl_core.dp import (
    clip_rows,
    epsilon_for,
    noise_std,
    privatize,
    privatize_together,
)
from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt
from fgl_privacy.inversion import PromptInverter
from fgl_server.validation import PayloadLimits, PayloadRejected, check_class_prompts

CPU = torch.device("cpu")
DIGITS = [str(d) for d in range(10)]


@pytest.fixture(scope="module", params=["offline-tiny", "fgl-mini"])
def encoder(request, tmp_path_factory) -> TransformersTextEncoder:
    return TransformersTextEncoder(request.param, tmp_path_factory.mktemp("cache"), CPU)


def wire(rows: torch.Tensor) -> torch.Tensor:
    """As a payload carries it: float16."""
    return rows.to(torch.float16).float()


def test_the_server_recovers_a_class_level_prompt_exactly_from_the_float16_payload(encoder):
    inverter = PromptInverter(encoder.tokenizer, encoder.model, CPU)
    prompt = class_prompt(PAPER_TEMPLATE, "7", "")
    recovery = inverter.recover(prompt, wire(encoder.encode([prompt])[0]))
    assert recovery.exact and recovery.token_accuracy == 1.0
    assert inverter.decode(recovery.recovered_ids) == prompt


def test_strong_noise_defeats_the_inversion(encoder):
    inverter = PromptInverter(encoder.tokenizer, encoder.model, CPU)
    prompt = class_prompt(PAPER_TEMPLATE, "7", "")
    rows = encoder.encode([prompt]).numpy()
    clip = float(np.linalg.norm(rows))
    noisy = privatize(rows, clip, noise_multiplier=1.0, rng=np.random.default_rng(0))
    recovery = inverter.recover(prompt, wire(torch.from_numpy(noisy[0])))
    assert not recovery.exact and recovery.token_accuracy < 0.5


def analytic_delta(epsilon: float, noise_multiplier: float) -> float:
    """Balle and Wang's analytic Gaussian (ICML 2018): delta(epsilon) for mu = 1 / multiplier."""
    from scipy.stats import norm

    mu = 1.0 / noise_multiplier
    return norm.cdf(-epsilon / mu + mu / 2) - np.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


def test_the_gaussian_mechanism_accounts_as_the_analytic_formula():
    # mu = 1 / noise multiplier = 1: delta(1) = Phi(-1/2) - e Phi(-3/2) = 0.126936...
    assert analytic_delta(1.0, noise_multiplier=1.0) == pytest.approx(0.1269367, abs=1e-6)
    assert epsilon_for(0.1269367375, noise_multiplier=1.0) == pytest.approx(1.0, abs=1e-6)
    for multiplier in (0.5, 1.0, 2.0, 4.0):  # dp-accounting's PLD at delta 1e-5: the formula's
        epsilon = epsilon_for(1e-5, multiplier)
        assert analytic_delta(epsilon, multiplier) == pytest.approx(1e-5, rel=1e-3)
    # more noise, less epsilon, at the same delta
    epsilons = [epsilon_for(1e-5, m) for m in (0.5, 1.0, 2.0, 4.0)]
    assert epsilons == sorted(epsilons, reverse=True) and epsilons[-1] < 1.0


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 256 / 60000, 14062)],  # Abadi et al.'s MNIST: sigma 1.1, lot 256, 60 epochs
        [(1.0, 1 / 78, 1500)] * 2,  # an adapted silo: 6 rounds x 250 steps, UNet and decoder
        [(0.6, 1 / 8, 1500)] * 2,
    ],
)
def test_dp_sgd_composes_within_renyi_dps_bound_and_close_to_it(history):
    """dp-accounting's privacy loss distribution is a tighter bound than Renyi DP (Opacus' own
    accountant) on the same DP-SGD history, and close to it: the library made for it agrees."""
    from opacus.accountants import RDPAccountant

    from fgl_core.adapters import epsilon_after

    renyi = RDPAccountant()
    renyi.history = history
    bound = renyi.get_epsilon(1e-5)
    assert 0.8 * bound < epsilon_after(history, 1e-5) <= bound
    assert epsilon_after(history * 2, 1e-5) > epsilon_after(history, 1e-5)  # composition adds


def test_clipping_bounds_each_embedding_and_keeps_small_ones():
    rows = np.stack([np.full((77, 4), 10.0), np.full((77, 4), 1e-3)])
    clipped = clip_rows(rows, clip=1.0)
    norms = np.linalg.norm(clipped.reshape(2, -1), axis=1)
    assert norms[0] == pytest.approx(1.0) and np.allclose(clipped[1], rows[1])
    assert noise_std(clip=1.0, noise_multiplier=0.5) == 1.0  # sensitivity 2 x clip


def test_parts_released_together_share_one_clip_and_each_get_the_noise():
    sequence, pooled = np.full((2, 77, 4), 1.0), np.full((2, 300), 10.0)  # norm 175
    clipped = privatize_together([sequence, pooled], 1.0, 0.0, np.random.default_rng(0))
    assert [part.shape for part in clipped] == [(2, 77, 4), (2, 300)]
    joint = np.sqrt(np.square(clipped[0]).sum(axis=(1, 2)) + np.square(clipped[1]).sum(axis=1))
    assert np.allclose(joint, 1.0)  # one norm over both parts, not 1.0 each
    assert np.allclose(clipped[0] / sequence, clipped[1][:, :1, None] / pooled[:, :1, None])
    noisy = privatize_together([sequence, pooled], 1.0, 0.5, np.random.default_rng(0))
    for part, kept in zip(noisy, clipped, strict=True):  # std 0.5 x 2 x 1.0 on every value
        assert np.std(part - kept) == pytest.approx(1.0, rel=0.2)
    alone = privatize_together([sequence, np.zeros((2, 0))], 1.0, 0.0, np.random.default_rng(0))
    assert alone[1].shape == (2, 0) and np.allclose(alone[0], clip_rows(sequence, 1.0))


def test_the_class_prompt_check_passes_honest_noised_embeddings_and_refuses_other_prompts(
    encoder,
):
    ours = [class_prompt(PAPER_TEMPLATE, d, "") for d in DIGITS]
    theirs = [class_prompt(PAPER_TEMPLATE, f"a photo of a {d}", "") for d in DIGITS]
    reference = encoder.encode(ours).numpy()
    clip = 0.5 * float(np.linalg.norm(reference[0]))  # every embedding is scaled down
    multiplier = 0.002
    limits = PayloadLimits(
        width=encoder.width,
        num_classes=10,
        probe=reference[0],
        class_prompts=reference[None],  # one domain
        class_names=tuple(DIGITS),
        embedding_clip=clip,
        noise_std=noise_std(clip, multiplier),
    )
    labels = np.arange(10)
    rng = np.random.default_rng(0)
    honest = privatize(reference, clip, multiplier, rng).astype(np.float16)
    check_class_prompts("node 1", honest, labels, limits)
    poisoned = privatize(encoder.encode(theirs).numpy(), clip, multiplier, rng).astype(np.float16)
    with pytest.raises(PayloadRejected, match="node 2: its embedding for class"):
        check_class_prompts("node 2", poisoned, labels, limits)


def test_the_cached_step_computes_what_the_encoder_computes(encoder):
    inverter = PromptInverter(encoder.tokenizer, encoder.model, CPU)
    ids = inverter.token_ids(class_prompt(PAPER_TEMPLATE, "3", ""))
    with torch.no_grad():  # the whole sequence at once, through the same float32 weights
        expected = inverter.model(torch.tensor([ids]))[0][0]
    first = inverter.layers[0].self_attn
    empty = torch.empty(1, first.num_heads, 0, first.head_dim)
    cache = [(empty, empty) for _ in inverter.layers]
    with torch.no_grad():
        for position, token in enumerate(ids):
            hidden, kv = inverter.step(torch.tensor([token]), position, cache)
            cache = [
                (torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                for (k0, v0), (k, v) in zip(cache, kv, strict=True)
            ]
            assert torch.allclose(hidden[0], expected[position], atol=1e-4), position


@pytest.mark.simulation
def test_the_report_reads_prompts_back_lists_disclosures_and_audits_the_run(tmp_path):
    from deploy.inprocess import run_in_process
    from fgl_privacy.report import report

    run_config = {
        "strategy": "fgl",
        "dataset": "digits",
        "generator": "offline-tiny",
        "captioner": "offline-tiny",
        "images-per-class": 4,
        "steps": 2,
        "oneshot-epochs": 1,
        "num-server-rounds": 1,
        "local-epochs": 1,
        "cache-dir": str(tmp_path / "cache"),
        "output-dir": str(tmp_path),
        "run-name": "run",
        "min-nodes": 2,
    }
    run_in_process(run_config, num_silos=2)
    run_dir = tmp_path / "run"
    path = report(run_dir, multipliers=(0.0, 1.0), per_silo=1, modes=("class",), lira_shadows=2)
    text = path.read_text()
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[5:7]
        for line in text.splitlines()
        if line.startswith("| class level")
    }
    tokens, exact = (float(cell) for cell in rows[("class level", "0")])
    assert tokens == 1.0 and exact == 1.0  # in the clear: every class prompt read back
    assert float(rows[("class level", "1")][0]) < 0.5  # strong noise: mostly lost
    assert text.count("\n| 0 | ") == 1 and text.count("\n| 1 | ") == 1  # both silos' histograms
    # the audit of what the run made: 40 synthetic images searched, LiRA on its model
    replication = json.loads((run_dir / "privacy_replication.json").read_text())
    assert replication["synthetic-images"] == 40 and 0 < replication["threshold"] <= 1
    assert "| online | " in text and "| offline | " in text
    for png in ("inversion", "replication_hist", "replication_pairs", "lira"):
        assert (run_dir / f"privacy_{png}.png").stat().st_size > 5_000, png
    # the same figures for programs
    figures = json.loads((run_dir / "privacy_report.json").read_text())
    by_noise = {row["noise_multiplier"]: row for row in figures["inversion"]}
    assert by_noise[0.0]["token_accuracy"] == tokens and by_noise[0.0]["epsilon"] is None
    assert float(rows[("class level", "1")][0]) == pytest.approx(
        by_noise[1.0]["token_accuracy"], abs=0.005
    )
    assert figures["replication"] == replication and figures["failed"] == {}
    assert len(figures["label-histograms"]) == 2
    assert figures["label-histogram-sum"] == np.sum(figures["label-histograms"], 0).tolist()
    lira = figures["lira"]
    online = next(line for line in text.splitlines() if line.startswith("| online | "))
    assert float(online.split("|")[2]) == pytest.approx(lira["online"]["auc"], abs=6e-4)
    assert lira["shadows"] == 2
    assert set(figures["seconds"]) == {"inversion", "replication search", "membership inference"}
    # the LiRA benchmark reads the same run's final and one-shot models back (checkpoint included)
    from benchmarks.lira import confidences_of
    from fgl_core.config import RunConfig
    from fgl_core.datasets import load_dataset

    data = load_dataset(RunConfig.from_flower(run_config))
    found = confidences_of(run_config, data, data.test)
    assert "fgl-one-shot" in found and len(found) == 2, list(found)
    assert all(c.shape == (len(data.test),) and np.isfinite(c).all() for c in found.values())


def test_the_server_reads_an_sdxl_prompt_back_from_its_first_encoders_columns(tmp_path):
    from fgl_client.embedding import text_encoder
    from fgl_core.offline_models import OFFLINE_TINY_SDXL, TINY_TEXT_WIDTH
    from fgl_privacy.report import server_inverter

    encoder = text_encoder(OFFLINE_TINY_SDXL, str(tmp_path), "cpu")
    inverter, columns = server_inverter(encoder)
    assert columns == TINY_TEXT_WIDTH < encoder.width  # the second encoder's columns follow
    prompt = class_prompt(PAPER_TEMPLATE, "7", "")
    ids = inverter.token_ids(prompt)
    with torch.no_grad():  # SDXL conditions on the penultimate hidden states, unnormed
        states = inverter.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        first = inverter.layers[0].self_attn
        empty = torch.empty(1, first.num_heads, 0, first.head_dim)
        hidden, _ = inverter.step(
            torch.tensor([ids[0]]), 0, [(empty, empty)] * len(inverter.layers)
        )
    assert torch.allclose(hidden[0], states[-2][0, 0], atol=1e-5)
    sent = encoder.encode([prompt])[0, :, :columns]  # what the silo's payload carries there
    recovery = inverter.recover(prompt, wire(sent))
    assert recovery.exact and inverter.decode(recovery.recovered_ids) == prompt


def test_the_report_says_a_class_conditional_generators_silos_send_no_text(tmp_path):
    from fgl_client.embedding import text_encoder
    from fgl_core.config import RunConfig
    from fgl_core.offline_models import OFFLINE_TINY_DIT
    from fgl_privacy.report import server_inverter, write_report

    assert server_inverter(text_encoder(OFFLINE_TINY_DIT, str(tmp_path), "cpu")) is None
    cfg = RunConfig.from_flower({"generator": OFFLINE_TINY_DIT})
    text = write_report(tmp_path, [], [[3, 0, 2]], cfg, 1e-5).read_text()
    assert "is class-conditional" in text and "| prompts | noise multiplier" not in text
    assert "\n| 0 | 3 | 0 | 2 |" in text  # the histogram it learns is still listed
    assert not (tmp_path / "privacy_inversion.png").exists()
