"""What an honest-but-curious server learns from a run's silos: `privacy_report.md` and its PNG.

    python -m fgl_privacy.report outputs/quickstart-fgl   # -> that folder's privacy_report.md

The same figures go to `privacy_report.json` beside it, for programs: each inversion row, the
label histograms (or their sum), the replication search's summary, LiRA's curves and the
seconds each part took.

For the run's config (its dataset, partition, generator and noise settings), each silo's
prompts are recomputed as the silo makes them, class-level and instance-level, and encoded
with the generator's text encoder as the silo would send them (float16, noised as configured).
The server's inversion (`fgl_privacy.inversion`) then tries to read each prompt back, without
noise and under a range of noise multipliers; the report gives token accuracy and exact
recovery, the (epsilon, delta) of each noise level, and what the server receives that it could
not compute itself (each silo's label histogram, or with `secure-histograms` only their sum).
A run of learned class embeddings has them learned again as its silos learned them (their seeds,
the run's adapter) and read back, with how far they moved; a run that adapted the generator has
what the server received in the adaptation rounds, and each silo's epsilon for them.

Where the run left its model and synthetic set, the report adds the replication search
(`fgl_privacy.replication`: each synthetic image's nearest real training image) and, with
`--lira-shadows N`, a membership-inference attack on the run's final model (`fgl_privacy.lira`,
offline and online, N small CNNs trained centrally on random halves of the silos' training data
and the test split as shadows; the paper-style comparison across methods, with shadows trained
exactly as each target, is `benchmarks/lira.py`).

    python -m fgl_privacy.report outputs/quickstart-fgl --lira-shadows 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgl_client.captioning import Captioner
from fgl_client.embedding import captioner, silo_prompts, text_encoder
from fgl_client.silo import Silo, load_silo
from fgl_client.text_encoding import GeneratorClasses, TextEncoder, XLTextEncoder
from fgl_core.config import ConfigError, RunConfig
from fgl_core.datasets import DatasetSplits, ImageSet, load_dataset
from fgl_core.dp import epsilon_for, joint_rows, privatize_together
from fgl_core.models import build_model, build_model_for
from fgl_core.payload import EmbedRequest
from fgl_core.plotting import headless_pyplot
from fgl_core.run_results import ResultsError, load_results
from fgl_core.training import InputSettings, TrainSettings
from fgl_privacy.inversion import PromptInverter
from fgl_privacy.lira import (
    attack_result,
    lira_scores,
    model_confidence,
    plot_roc,
    random_halves,
    train_on_halves,
)
from fgl_privacy.replication import classifier_features, plot_replication, replication_search
from fgl_server.synthetic_store import SyntheticStore

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
MULTIPLIERS = (0.0, 0.01, 0.1)
MAX_MULTIPLIER = 1e6  # as the run config bounds embedding-noise


class ReportError(RuntimeError):
    """A run folder the report cannot read, or a part of it that failed; names what and where."""


def read_results(run_dir: Path) -> tuple[dict, RunConfig]:
    """The run's results.json and config, or `ReportError` naming the file and what is wrong."""
    path = run_dir / "results.json"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise ReportError(f"{path}: missing (the run has not written its results yet?)")
    try:
        results = load_results(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: not readable JSON, truncated or damaged ({err})") from None
    except ResultsError as err:
        raise ReportError(str(err)) from None
    if not isinstance(results.get("config"), dict):
        raise ReportError(f"{path}: holds no run config (a results.json has a 'config' object)")
    try:
        return results, RunConfig.from_flower(results["config"], where=str(path))
    except ConfigError as err:
        raise ReportError(str(err)) from None


@dataclass(frozen=True)
class InversionRow:
    mode: str
    noise_multiplier: float
    epsilon: float | None  # None: no noise, no privacy guarantee
    prompts: int
    token_accuracy: float
    exact: float
    example: tuple[str, str]  # (the prompt, what the server read)
    moved: tuple[float, ...] = ()  # learned: each silo's median L2 distance from its templates'
    # embeddings, over their norms


def server_inverter(encoder: TextEncoder) -> tuple[PromptInverter, int] | None:
    """The server's inversion for the silos' encoder, and the columns of each embedding it reads
    (SDXL's first text encoder fills the first ones, with its penultimate states); None for a
    class-conditional generator, whose silos send no text."""
    if isinstance(encoder, GeneratorClasses):
        return None
    if isinstance(encoder, XLTextEncoder):
        first = encoder.pipe.text_encoder
        inverter = PromptInverter(encoder.pipe.tokenizer, first, CPU, penultimate=True)
        return inverter, int(first.config.hidden_size)
    return PromptInverter(encoder.tokenizer, encoder.model, CPU), encoder.width  # type: ignore[attr-defined]


def measure(
    inverter: PromptInverter,
    prompts: list[str],
    parts: list[np.ndarray],
    columns: int,
    mode: str,
    clip: float,
    multiplier: float,
    delta: float,
    rng: np.random.Generator,
) -> InversionRow:
    """Invert every prompt's (noised) float16 rows, the first `columns` of each; the mean token
    accuracy and exact share. `parts`: the embeddings, and SDXL's pooled ones (noised with
    them as one release, as the silo does)."""
    sent = privatize_together(parts, clip, multiplier, rng)[0] if multiplier else parts[0]
    sent = sent[..., :columns].astype(np.float16).astype(np.float32)
    recoveries = [
        inverter.recover(prompt, torch.from_numpy(row))
        for prompt, row in zip(prompts, sent, strict=True)
    ]
    return InversionRow(
        mode=mode,
        noise_multiplier=multiplier,
        epsilon=epsilon_for(delta, multiplier) if multiplier else None,
        prompts=len(prompts),
        token_accuracy=float(np.mean([r.token_accuracy for r in recoveries])),
        exact=float(np.mean([r.exact for r in recoveries])),
        example=(prompts[0], inverter.decode(recoveries[0].recovered_ids)),
    )


def silo_texts(
    cfg: RunConfig, silos: list[Silo], mode: str, per_silo: int, cache_dir: str
) -> list[str]:
    """Distinct prompts the silos would encode in `mode`, up to `per_silo` from each."""
    request = EmbedRequest.from_config(
        cfg.model_copy(update={"prompt_mode": mode, "prompt_template": ""}),
        max_captions_per_class=max(1, math.ceil(per_silo / silos[0].num_classes)),
    )
    made: list[Captioner] = []  # one captioner for every silo, built on first use

    def captioner_fn() -> Captioner:
        if not made:
            made.append(captioner(request.captioner, cache_dir, "cpu", request.caption_max_tokens))
        return made[0]

    prompts: list[str] = []
    for silo in silos:
        texts = silo_prompts(request, silo, captioner_fn).texts
        prompts += [t for t in texts[:per_silo] if t not in prompts]
    return prompts


def learned_embeddings(
    cfg: RunConfig, silos: list[Silo], per_silo: int, run_dir: Path, encoder: TextEncoder
) -> tuple[list[str], list[np.ndarray], tuple[float, ...]]:
    """Up to `per_silo` class prompts of each silo and their embeddings learned as the silo
    learns them (`fgl_client.learned`, its seeds), against the generator the run adapted
    (its `adapter/`) or the stock one: (the prompts, [learned, pooled] as the silo sends them,
    each silo's median distance moved, relative to the template's norm)."""
    from fgl_client.learned import ClassEmbeddingLearner
    from fgl_core.adapted_generator import apply_adapter, load_pipeline
    from fgl_core.pretrained import resolve_model_ref

    pipe = load_pipeline(resolve_model_ref(cfg.generator, "generator", cfg.cache_dir), CPU)
    if (run_dir / "adapter").is_dir():
        apply_adapter(pipe, run_dir / "adapter")
    pipe.unet.requires_grad_(False)
    request = EmbedRequest.from_config(cfg)
    prompts, learned, pooled, moved = [], [], [], []
    for silo in silos:
        sent = silo_prompts(request, silo)
        texts, labels = sent.texts[:per_silo], sent.labels[:per_silo]
        embeds, pool = encoder.encode_with_pooled(texts)
        learner = ClassEmbeddingLearner(cfg, request, silo, None, silo.partition_id, pipe)
        rows = learner(embeds, labels).to(torch.float16).to(torch.float32)
        gaps = torch.linalg.norm((rows - embeds).flatten(1), dim=1) / torch.linalg.norm(
            embeds.flatten(1), dim=1
        )
        moved.append(round(float(np.median(gaps.numpy())), 4))
        prompts += texts
        learned.append(rows.numpy())
        pooled.append(pool.numpy())
    return prompts, [np.concatenate(learned), np.concatenate(pooled)], tuple(moved)


def adaptation_section(results: dict, cfg: RunConfig) -> list[str]:
    """What the adaptation rounds gave the server: each silo's adapter every round, and under
    DP-SGD each silo's (epsilon, delta) for them."""
    record = results.get("adaptation")
    if cfg.generator_adaptation == "none" or not isinstance(record, dict):
        return []
    rounds = record.get("rounds") or []
    parts = "the UNet's LoRA B factors" + (" and the decoder's weights" if cfg.adapt_decoder
                                            else "")  # fmt: skip
    lines = [
        "", "## The generator's adapter", "",
        f"In {len(rounds)} adaptation rounds the server received each silo's adapter every "
        f"round ({parts}, {record.get('adapter-bytes', 0) / 1e6:.2f} MB): a model update trained "
        "on the silo's own images, which the server could use alone, not only in the average. "
        "The replication search below runs over the synthetic set the averaged adapter drew.",
    ]  # fmt: skip
    dp = record.get("dp")
    if not cfg.adaptation_noise or not isinstance(dp, dict):
        return [*lines, "", "No DP-SGD (`adaptation-noise = 0`): the adapters carry no "
                "guarantee; what they give away is measured only by that search."]  # fmt: skip
    epsilons = dp.get("epsilon-per-silo") or {}
    lines += [
        "", f"DP-SGD on every silo (noise multiplier {cfg.adaptation_noise:g}, each image's "
        f"gradient clipped to {cfg.adaptation_clip:g}); each silo's (epsilon, delta) over all "
        f"rounds, by dp-accounting, at delta = {cfg.adaptation_delta:g}:", "",
        "| silo | epsilon |", "| --- | --- |",
    ]  # fmt: skip
    lines += [f"| {silo} | {float(eps):.3g} |" for silo, eps in sorted(epsilons.items())]
    return lines


def budget_section(results: dict) -> list[str]:
    """Each silo's (epsilon, delta) for the whole run as results.json's `privacy` states it
    (`fgl_server.budget`): each part's and all composed, and what no guarantee covers."""
    privacy = results.get("privacy")
    if not isinstance(privacy, dict) or not isinstance(privacy.get("silos"), dict):
        return []
    silos = privacy["silos"]
    parts = sorted({p for silo in silos.values() for p in silo.get("parts", {})})
    accountant = privacy.get("accountant", "dp-accounting")
    lines = ["", "## Each silo's budget for the run", "",
             f"Composed by {accountant}: every noised release of the silo, each part alone and "
             "all together (epsilon at the silo's delta).", ""]  # fmt: skip
    if silos:
        lines += ["| silo | delta | " + " | ".join(parts) + " | whole run |",
                  "| --- " * (len(parts) + 3) + "|"]  # fmt: skip
        for node, silo in sorted(silos.items(), key=lambda kv: int(kv[0].split()[-1])):
            cells = [_epsilon(silo.get("parts", {}).get(p)) for p in parts]
            lines.append(f"| {node} | {silo.get('delta')} | " + " | ".join(cells)
                         + f" | {_epsilon(silo.get('epsilon'))} |")  # fmt: skip
    else:
        lines.append("No silo sent anything noised: the run claims no guarantee.")
    uncovered = privacy.get("not-covered") or []
    if uncovered:
        lines += ["", "Covered by no guarantee: " + "; ".join(map(str, uncovered)) + "."]
    return lines


def _epsilon(value: object) -> str:
    return f"{float(value):.3g}" if isinstance(value, (int, float)) else "none"


def inversion_section(
    run_dir: Path, rows: list[InversionRow], cfg: RunConfig, delta: float
) -> list[str]:
    """The inversion table and its plot (privacy_inversion.png)."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("class", "instance", "learned"):
        points = [(r.noise_multiplier, r.token_accuracy) for r in rows if r.mode == mode]
        if points:
            x, y = zip(*[(max(m, 1e-4), a) for m, a in points], strict=True)
            ax.plot(x, y, marker="o", label=f"{mode}-level prompts")
    ax.set_xscale("log")
    ax.set_xlabel("noise multiplier (0 plotted at 1e-4)")
    ax.set_ylabel("tokens recovered by the server")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"embedding inversion, {cfg.generator}", fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "privacy_inversion.png", dpi=120)
    plt.close(fig)

    clipped_to = (
        f"{cfg.embedding_clip:g} (the run's embedding-clip)"
        if cfg.embedding_clip
        else "the median embedding norm (the run clipped none)"
    )
    lines = [
        f"Generator (its text encoder is the silos'): `{cfg.generator}`. Each embedding is one "
        f"release; epsilon at delta = {delta:g} for the Gaussian mechanism (fgl_core.dp), with "
        f"each embedding clipped to L2 norm {clipped_to}. "
        f"The run itself used noise multiplier {cfg.embedding_noise:g}. Multiplier 0: the "
        "embeddings as encoded (float16), no guarantee. The search for each prompt stops at its "
        "end token or one token past the true length.",
        "",
        "| prompts | noise multiplier | epsilon | prompts tried | tokens recovered | "
        "prompts recovered exactly | example: sent / read by the server |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        epsilon = f"{r.epsilon:.3g}" if r.epsilon is not None else "none"
        sent, read = (text.replace("|", "/") for text in r.example)
        lines.append(
            f"| {r.mode} level | {r.noise_multiplier:g} | {epsilon} | {r.prompts} | "
            f"{r.token_accuracy:.2f} | {r.exact:.2f} | `{sent}` / `{read}` |"
        )
    learned = [r for r in rows if r.mode == "learned"]
    if learned:
        lines += [
            "",
            f"Learned level: each prompt's class embedding learned as its silo learned it "
            f"(each silo's median moved {min(learned[0].moved):.2f}-{max(learned[0].moved):.2f} "
            "of the template's norm), read back against "
            "the template it started from; what it encodes of the silo's images beyond the "
            "class is what the synthetic images it draws show (the replication search).",
        ]
    return [*lines, "", "![inversion against noise](privacy_inversion.png)"]


def write_report(
    run_dir: Path,
    rows: list[InversionRow],
    histograms: list[list[int]],
    cfg: RunConfig,
    delta: float,
    extra: tuple[str, ...] = (),
) -> Path:
    lines = [f"# What the server learns: {run_dir.name}", ""]
    if rows:
        lines += inversion_section(run_dir, rows, cfg, delta)
    else:
        lines += [
            f"Generator `{cfg.generator}` is class-conditional: each silo sends the ids of its "
            "classes in the generator's label set, and no text, so there is no prompt to read "
            "back.",
        ]
    lines += ["", "## What the server could not compute itself", ""]
    if cfg.secure_histograms:
        total = histogram_sum(histograms)
        lines += [
            "Class-level prompts are public templates of public class names, and with "
            "`secure-histograms` every silo sends every class's prompt, so they tell the server "
            "nothing. The label histograms reach it only as their sum, through Flower's SecAgg+ "
            "(no silo's own histogram is ever sent in the clear):",
            "",
            "| sum | " + " | ".join(map(str, total)) + " |",
            "| --- |" + " --- |" * len(total),
        ]
    else:
        lines += [
            "Class-level prompts are public templates of public class names: their embeddings "
            "tell the server nothing beyond which classes a silo holds. What it learns is each "
            "silo's label histogram (images per class), sent in the clear "
            "(`secure-histograms = true` sends only their sum, by SecAgg+):",
            "",
            "| silo | " + " | ".join(str(c) for c in range(len(histograms[0]))) + " |",
            "| --- |" + " --- |" * len(histograms[0]),
        ]
        lines += [f"| {i} | " + " | ".join(map(str, h)) + " |" for i, h in enumerate(histograms)]
    lines += list(extra)
    path = run_dir / "privacy_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _union(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(
        np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets])
    )


def _final_model(
    run_dir: Path, cfg: RunConfig, data: DatasetSplits
) -> tuple[nn.Module | None, str]:
    """The run's final model.pt, or None and why it cannot be used (missing, unloadable, not
    this run's model, or NaN or infinite weights: a report on it would measure nothing)."""
    path = run_dir / "model.pt"
    if not path.is_file():
        return None, "the run left no model.pt"
    model = build_model_for(cfg, data.num_classes, data.image_size)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # a damaged file, or another model's weights
        return None, f"{path} cannot be loaded as this run's {cfg.model} ({type(err).__name__})"
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        return None, f"{path} has NaN or infinite weights ({len(bad)} tensors, first {bad[0]!r})"
    return model, ""


def replication_section(
    run_dir: Path,
    results: dict,
    cfg: RunConfig,
    model: nn.Module | None,
    train: ImageSet,
    data: DatasetSplits,
    unusable: str = "the run left no model.pt",
    figures: dict[str, Any] | None = None,
) -> list[str]:
    """The replication search on the run's synthetic set, with the final model's features;
    its summary also into `figures["replication"]`."""
    lines = ["", "## Replication: do synthetic images copy real ones?", ""]
    synthesis = results.get("synthesis")
    store = synthesis.get("store") if isinstance(synthesis, dict) else None
    if model is None:
        return [*lines, f"Not measured: {unusable}."]
    if not isinstance(store, str) or not Path(store).is_dir():
        return [*lines, "Not measured: the run left no synthetic store."]
    synthetic = SyntheticStore.open(store).load()
    features = classifier_features(model, CPU, InputSettings.from_config(cfg))
    result = replication_search(features, synthetic, train, data.test)
    plot_replication(
        result,
        synthetic,
        train,
        run_dir / "privacy_replication_hist.png",
        run_dir / "privacy_replication_pairs.png",
    )
    summary = result.to_json()
    (run_dir / "privacy_replication.json").write_text(json.dumps(summary, indent=2))
    if figures is not None:
        figures["replication"] = summary
    return [
        *lines,
        f"For each of the {len(synthetic)} synthetic images, the nearest of the silos' "
        f"{len(train)} training images by cosine similarity of the final model's penultimate "
        "features (`fgl_privacy.replication`). The threshold is calibrated on the test split, "
        f"which no model trained on: {summary['calibration']}, {summary['threshold']:.3f}.",
        "",
        "| synthetic images | above the threshold | held-out real above it | near-exact "
        "(>= 0.999) | median similarity | highest |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {len(synthetic)} | {summary['share-above-threshold']:.1%} | "
        f"{summary['heldout-share-above-threshold']:.1%} | {summary['share-near-exact']:.1%} | "
        f"{summary['median-similarity']:.3f} | {summary['max-similarity']:.3f} |",
        "",
        "![similarity histograms](privacy_replication_hist.png)",
        "",
        "The closest pairs (synthetic above, its nearest training image below):",
        "",
        "![closest pairs](privacy_replication_pairs.png)",
    ]


def membership_section(
    run_dir: Path,
    cfg: RunConfig,
    model: nn.Module | None,
    train: ImageSet,
    data: DatasetSplits,
    shadows: int,
    seed: int,
    unusable: str = "the run left no model.pt",
    figures: dict[str, Any] | None = None,
) -> list[str]:
    """LiRA on the run's final model: members are the silos' training images, non-members
    the test split; the shadows are small CNNs trained centrally on random halves of both.
    Each variant's curve summary also into `figures["lira"]`."""
    lines = ["", "## Membership inference (LiRA) on this run's model", ""]
    if not shadows:
        return [
            *lines,
            "Not run for this report (`--lira-shadows 16` runs it). docs/privacy.md gives the "
            "attack across methods, from `python -m benchmarks.lira`.",
        ]
    if model is None:
        return [*lines, f"Not measured: {unusable}."]
    pool = _union([train, data.test])
    member = np.r_[np.ones(len(train), bool), np.zeros(len(data.test), bool)]
    masks = random_halves(len(pool), shadows, seed)
    epochs = max(cfg.local_epochs, cfg.num_server_rounds * cfg.local_epochs)
    settings = TrainSettings.from_config(cfg, epochs=epochs, seed=seed)
    size = cfg.model_input_size(data.image_size)
    build = lambda: build_model(cfg.model, data.num_classes, size)  # noqa: E731
    confidences = train_on_halves(pool, masks, build, settings, CPU)
    target = model_confidence(model, pool, CPU, settings)
    curves = {
        "online" if online else "offline": attack_result(
            lira_scores(target, confidences, masks, online), member
        )
        for online in (True, False)
    }
    plot_roc(curves, run_dir / "privacy_lira.png", f"LiRA on {run_dir.name}")
    if figures is not None:
        figures["lira"] = {"shadows": shadows, **{k: c.to_json() for k, c in curves.items()}}
    lines += [
        f"Members: the silos' {len(train)} training images; non-members: the {len(data.test)} "
        f"test images. {shadows} shadow models ({cfg.model}, {epochs} epochs, trained centrally "
        "on random halves of both), so the attacker knows the data but not the federated "
        "recipe: a weaker attacker than `benchmarks/lira.py`'s.",
        "",
        "| variant | AUC | TPR at 0.1% FPR | TPR at 1% FPR |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in curves.items():
        lines.append(
            f"| {name} | {result.auc:.3f} | {result.tpr_at_fpr[0.001]:.2%} | "
            f"{result.tpr_at_fpr[0.01]:.2%} |"
        )
    return [*lines, "", "![LiRA ROC](privacy_lira.png)"]


def run_silos(results: dict, cfg: RunConfig) -> list[Silo]:
    """The run's silos, rebuilt from its config as each loaded its partition."""
    silo_count = results.get("traffic", {}).get("silos", {})
    count = (len(silo_count) if isinstance(silo_count, dict) else 0) or cfg.min_nodes
    return [load_silo(cfg, {"partition-id": p, "num-partitions": count}) for p in range(count)]


def inversion_rows(
    cfg: RunConfig,
    silos: list[Silo],
    multipliers: tuple[float, ...] = MULTIPLIERS,
    per_silo: int = 1,
    delta: float = 1e-5,
    seed: int = 0,
    modes: tuple[str, ...] = ("class", "instance"),
    run_dir: Path | None = None,
) -> list[InversionRow]:
    """The server's inversion of up to `per_silo` prompts of each silo in each mode, as sent
    (float16) and under each noise multiplier (and the run's own); for a run of learned
    embeddings (given its folder) first theirs, learned as its silos learned them; none for a
    class-conditional generator."""
    cache_dir = cfg.cache_dir if Path(cfg.cache_dir).is_dir() else tempfile.mkdtemp()
    encoder = text_encoder(cfg.generator, cache_dir, "cpu")
    target = server_inverter(encoder)
    rng = np.random.default_rng(seed)
    rows: list[InversionRow] = []
    if target is None:
        log.info("a class-conditional generator: its silos send class ids, no text to invert")
        return rows
    inverter, columns = target
    start = time.perf_counter()
    if cfg.prompt_mode == "learned" and run_dir is not None:  # what this run's silos sent
        prompts, parts, moved = learned_embeddings(cfg, silos, per_silo, run_dir, encoder)
        row = measure(inverter, prompts, parts, columns, "learned", 0.0, 0.0, delta, rng)
        rows.append(dataclasses.replace(row, moved=moved))
        log.info("learned: %.2f of the templates' tokens read back", row.token_accuracy)
    for mode in modes:
        prompts = silo_texts(cfg, silos, mode, per_silo, cache_dir)
        parts = [t.numpy() for t in encoder.encode_with_pooled(prompts)]
        # the run's clip; if it had none, the median norm (it scales few embeddings down)
        norms = np.linalg.norm(joint_rows(parts), axis=1)
        clip = cfg.embedding_clip or float(np.median(norms))
        for multiplier in sorted({*multipliers, cfg.embedding_noise}):
            row = measure(inverter, prompts, parts, columns, mode, clip, multiplier, delta, rng)
            log.info("%s level, noise %g: %.2f of tokens", mode, multiplier, row.token_accuracy)
            rows.append(row)
    log.info("inversion: %.0f s", time.perf_counter() - start)
    return rows


def report(
    run_dir: Path,
    multipliers: tuple[float, ...] = MULTIPLIERS,
    per_silo: int = 1,
    delta: float = 1e-5,
    seed: int = 0,
    modes: tuple[str, ...] = ("class", "instance"),
    lira_shadows: int = 0,
) -> Path:
    """Measure the run in `run_dir` and write its privacy_report.md; return its path. The report
    is written after each part (inversion, replication, membership), so a part that fails
    keeps what came before; it then says which failed, and `ReportError` names it."""
    check_arguments(multipliers, per_silo, delta, lira_shadows)
    results, cfg = read_results(run_dir)
    silos = run_silos(results, cfg)
    histograms = [silo.train.label_histogram(silo.num_classes) for silo in silos]
    start = time.perf_counter()
    rows = inversion_rows(cfg, silos, multipliers, per_silo, delta, seed, modes, run_dir)
    figures = report_figures(run_dir, cfg, rows, histograms, delta)
    figures["seconds"]["inversion"] = round(time.perf_counter() - start, 1)
    path = write_report(run_dir, rows, histograms, cfg, delta)  # kept if what follows fails
    write_figures(run_dir, figures)
    extra: list[str] = budget_section(results) + adaptation_section(results, cfg)
    adapted = results.get("adaptation")
    figures["adaptation-dp"] = adapted.get("dp") if isinstance(adapted, dict) else None
    failed: list[str] = []

    def part(name: str, heading: str, run) -> None:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        try:
            extra.extend(run())
        except Exception as err:  # the report keeps the parts done; the error names this one
            log.exception("%s failed", name)
            failed.append(f"{name}: {type(err).__name__}: {err}")
            figures["failed"][name] = f"{type(err).__name__}: {err}"
            extra.extend(["", heading, "", f"Failed: {type(err).__name__}: {err}"])
        seconds = time.perf_counter() - start
        log.info("%s: %.0f s", name, seconds)
        figures["seconds"][name] = round(seconds, 1)
        write_report(run_dir, rows, histograms, cfg, delta, tuple(extra))
        write_figures(run_dir, figures)

    data = load_dataset(cfg)
    train = _union([silo.train for silo in silos])
    model, unusable = _final_model(run_dir, cfg, data)
    if unusable:
        log.warning("%s: the replication search and LiRA are not measured", unusable)
    part(
        "replication search",
        "## Replication: do synthetic images copy real ones?",
        lambda: replication_section(run_dir, results, cfg, model, train, data, unusable, figures),
    )
    part(
        "membership inference",
        "## Membership inference (LiRA) on this run's model",
        lambda: membership_section(
            run_dir, cfg, model, train, data, lira_shadows, seed, unusable, figures
        ),
    )
    if failed:
        raise ReportError(f"{path} written without: " + "; ".join(failed))
    return path


def report_figures(
    run_dir: Path,
    cfg: RunConfig,
    rows: list[InversionRow],
    histograms: list[list[int]],
    delta: float,
) -> dict[str, Any]:
    """What privacy_report.json starts with; the parts add theirs (`replication`, `lira`)."""
    return {
        "run": run_dir.name,
        "generator": cfg.generator,
        "delta": delta,
        "inversion": [asdict(row) for row in rows],
        # what the server receives: with secure-histograms only the sum
        "label-histograms": None if cfg.secure_histograms else histograms,
        "label-histogram-sum": histogram_sum(histograms),
        "seconds": {},
        "failed": {},
    }


def histogram_sum(histograms: list[list[int]]) -> list[int]:
    """The silos' label histograms summed class by class: all that `secure-histograms` lets the
    server see."""
    return [sum(counts) for counts in zip(*histograms, strict=True)]


def write_figures(run_dir: Path, figures: dict[str, Any]) -> Path:
    path = run_dir / "privacy_report.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    return path


def check_arguments(
    multipliers: tuple[float, ...], per_silo: int, delta: float, lira_shadows: int
) -> None:
    """`ReportError` naming each argument out of range, before any work."""
    problems = []
    bad = [m for m in multipliers if not (math.isfinite(m) and 0 <= m <= MAX_MULTIPLIER)]
    if bad:
        problems.append(f"--noise {bad}: each multiplier is finite, in 0..{MAX_MULTIPLIER:g}")
    if per_silo < 1:
        problems.append(f"--per-silo {per_silo}: at least 1 prompt per silo")
    if not (math.isfinite(delta) and 0 < delta < 1):
        problems.append(f"--delta {delta}: in (0, 1)")
    if lira_shadows < 0 or lira_shadows == 1:
        problems.append(f"--lira-shadows {lira_shadows}: 0 (no LiRA) or at least 2")
    if problems:
        raise ReportError("; ".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fgl_privacy.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (it holds results.json)")
    parser.add_argument("--noise", type=float, nargs="+", default=list(MULTIPLIERS))
    parser.add_argument("--per-silo", type=int, default=1, help="prompts inverted per silo")
    parser.add_argument(
        "--lira-shadows", type=int, default=0, help="shadow models for LiRA; 0: no LiRA"
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--modes", nargs="+", default=["class", "instance"], choices=["class", "instance"]
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_arguments(tuple(args.noise), args.per_silo, args.delta, args.lira_shadows)
    except ReportError as err:
        parser.error(str(err))  # exit 2, before anything is loaded
    try:
        path = report(
            args.run_dir,
            tuple(args.noise),
            args.per_silo,
            args.delta,
            modes=tuple(args.modes),
            lira_shadows=args.lira_shadows,
        )
    except ReportError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
