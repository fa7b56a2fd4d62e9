"""What an honest-but-curious server learns from a run's silos: `privacy_report.md` and its PNG.

    python -m fgl_privacy.report outputs/quickstart-fgl   # -> that folder's privacy_report.md

For the run's config (its dataset, partition, generator and noise settings), each silo's
prompts are recomputed as the silo makes them, class-level and instance-level, and encoded
with the generator's text encoder as the silo would send them (float16, noised as configured).
The server's inversion (`fgl_privacy.inversion`) then tries to read each prompt back, without
noise and under a range of noise multipliers; the report gives token accuracy and exact
recovery, the (epsilon, delta) of each noise level, and what the server receives that it could
not compute itself (each silo's label histogram).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgl_client.captioning import Captioner
from fgl_client.embedding import captioner, silo_prompts, text_encoder
from fgl_client.silo import Silo, load_silo
from fgl_core.config import RunConfig
from fgl_core.dp import epsilon_for, privatize
from fgl_core.payload import EmbedRequest
from fgl_core.plotting import headless_pyplot
from fgl_privacy.inversion import PromptInverter

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
MULTIPLIERS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)


@dataclass(frozen=True)
class InversionRow:
    mode: str
    noise_multiplier: float
    epsilon: float | None  # None: no noise, no privacy guarantee
    prompts: int
    token_accuracy: float
    exact: float
    example: tuple[str, str]  # (the prompt, what the server read)


def measure(
    inverter: PromptInverter,
    prompts: list[str],
    rows: np.ndarray,
    mode: str,
    clip: float,
    multiplier: float,
    delta: float,
    rng: np.random.Generator,
) -> InversionRow:
    """Invert every prompt's (noised) float16 rows; the mean token accuracy and exact share."""
    sent = privatize(rows, clip, multiplier, rng) if multiplier else rows
    sent = sent.astype(np.float16).astype(np.float32)
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
            made.append(captioner(request.captioner, cache_dir, "cpu"))
        return made[0]

    prompts: list[str] = []
    for silo in silos:
        texts, _, _ = silo_prompts(request, silo, captioner_fn)
        prompts += [t for t in texts[:per_silo] if t not in prompts]
    return prompts


def write_report(
    run_dir: Path,
    rows: list[InversionRow],
    histograms: list[list[int]],
    cfg: RunConfig,
    delta: float,
) -> Path:
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("class", "instance"):
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
        f"# What the server learns: {run_dir.name}",
        "",
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
    lines += [
        "",
        "![inversion against noise](privacy_inversion.png)",
        "",
        "## What the server could not compute itself",
        "",
        "Class-level prompts are public templates of public class names: their embeddings tell "
        "the server nothing beyond which classes a silo holds. What it learns is each silo's "
        "label histogram (images per class), sent in the clear:",
        "",
        "| silo | " + " | ".join(str(c) for c in range(len(histograms[0]))) + " |",
        "| --- |" + " --- |" * len(histograms[0]),
    ]
    lines += [f"| {i} | " + " | ".join(map(str, h)) + " |" for i, h in enumerate(histograms)]
    path = run_dir / "privacy_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report(
    run_dir: Path,
    multipliers: tuple[float, ...] = MULTIPLIERS,
    per_silo: int = 10,
    delta: float = 1e-5,
    seed: int = 0,
    modes: tuple[str, ...] = ("class", "instance"),
) -> Path:
    """Measure the run in `run_dir` and write its privacy_report.md; return its path."""
    results = json.loads((run_dir / "results.json").read_text())
    cfg = RunConfig.from_flower(results["config"], where=f"{run_dir / 'results.json'}")
    count = len(results.get("traffic", {}).get("silos", {})) or cfg.min_nodes
    cache_dir = cfg.cache_dir if Path(cfg.cache_dir).is_dir() else tempfile.mkdtemp()
    encoder = text_encoder(cfg.generator, cache_dir, "cpu")
    inverter = PromptInverter(encoder.tokenizer, encoder.model, CPU)
    rng = np.random.default_rng(seed)
    silos = [load_silo(cfg, {"partition-id": p, "num-partitions": count}) for p in range(count)]
    histograms = [silo.train.label_histogram(silo.num_classes) for silo in silos]
    rows = []
    for mode in modes:
        prompts = silo_texts(cfg, silos, mode, per_silo, cache_dir)
        encoded = encoder.encode(prompts).numpy()
        # the run's clip; if it had none, the median norm (it scales few embeddings down)
        norms = np.linalg.norm(encoded.reshape(len(encoded), -1), axis=1)
        clip = cfg.embedding_clip or float(np.median(norms))
        for multiplier in sorted({*multipliers, cfg.embedding_noise}):
            row = measure(inverter, prompts, encoded, mode, clip, multiplier, delta, rng)
            log.info("%s level, noise %g: %.2f of tokens", mode, multiplier, row.token_accuracy)
            rows.append(row)
    return write_report(run_dir, rows, histograms, cfg, delta)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fgl_privacy.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (it holds results.json)")
    parser.add_argument("--noise", type=float, nargs="+", default=list(MULTIPLIERS))
    parser.add_argument("--per-silo", type=int, default=10, help="prompts tried per silo")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--modes", nargs="+", default=["class", "instance"], choices=["class", "instance"]
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = report(
        args.run_dir, tuple(args.noise), args.per_silo, args.delta, modes=tuple(args.modes)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
