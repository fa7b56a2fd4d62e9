"""Each silo's privacy budget for the run, read from what results.json records of it.

One (epsilon, delta) per silo at `adaptation-delta`, composed by dp-accounting
(`fgl_core.accounting`) from every noised release the silo took part in:

- its noised embeddings (`embedding-noise`), if the server accepted its payload;
- its DP-SGD adaptation rounds (`adaptation-noise`), rebuilt from each round it took part in
  (its images, the run's noise, batch and steps);
- the training rounds under `round-dp`: per round, the Gaussian multiplier of the noised mean
  against that silo's update (`strategies.private`), and under adaptive clipping the noised
  clipped count (sensitivity 1).

The rounds' guarantee is about a silo's whole update, so it holds for any one image in it; the
others are about one image; composed, the figure is about one image of the silo. What no
mechanism covers is named beside it (`not-covered`), never folded into it.
"""

from __future__ import annotations

from typing import Any

from fgl_core.accounting import silo_budget
from fgl_core.adapters import sample_rate
from fgl_core.config import RunConfig
from fgl_server.nodes import node_id, node_name
from fgl_server.results import SILO_PREFIX
from strategies.private import COUNT_NOISE_KEY, NOISE_KEY


def privacy_budget(cfg: RunConfig, results: dict[str, Any]) -> dict:
    """results.json's `privacy`: each silo's budget, each part and composed, and what no
    guarantee covers."""
    adaptation = adaptation_history(cfg, results.get("adaptation"))
    rounds = round_history(results.get("rounds", []))
    embedded = {node_id(n) for n in results.get("embedding", {}).get("nodes-accepted", [])}
    nodes = sorted(set(adaptation) | set(rounds) | embedded)
    return {
        "accountant": "dp-accounting, privacy loss distributions",
        "silos": {
            node_name(node): silo_budget(
                cfg.adaptation_delta,
                cfg.embedding_noise if node in embedded else 0.0,
                adaptation.get(node, []),
                rounds.get(node, []),
            )
            for node in nodes
        },
        "not-covered": not_covered(cfg),
    }


def adaptation_history(cfg: RunConfig, adaptation: dict | None) -> dict[int, list]:
    """Per node, its DP-SGD stretches: (noise multiplier, sample rate, steps)."""
    history: dict[int, list[tuple[float, float, int]]] = {}
    if not adaptation or not cfg.adaptation_noise:
        return history
    parts = 2 if cfg.adapt_decoder else 1
    for record in adaptation.get("rounds", []):
        for node, silo in record["silos"].items():
            if "left-out" in silo or "num-examples" not in silo:
                continue
            rate = sample_rate(int(silo["num-examples"]), cfg.adaptation_batch_size)
            step = (cfg.adaptation_noise, rate, cfg.adaptation_steps)
            history.setdefault(int(node), []).extend([step] * parts)
    return history


def round_history(rounds: list[dict]) -> dict[int, list[float]]:
    """Per node, the Gaussian multiplier of each noised release of the rounds it was
    aggregated in (the adaptive clip's count beside its update's)."""
    history: dict[int, list[float]] = {}
    prefix = f"{SILO_PREFIX}{NOISE_KEY}"
    for row in rounds:
        count = row.get(f"{SILO_PREFIX}{COUNT_NOISE_KEY}")
        for key, multiplier in row.items():
            if key.startswith(prefix):
                releases = history.setdefault(int(key[len(prefix) :]), [])
                releases.extend([float(multiplier)] + ([float(count)] if count else []))
    return history


def not_covered(cfg: RunConfig) -> list[str]:
    """What the silos send that no noise protects, by the run's config."""
    uncovered = []
    if cfg.num_server_rounds and cfg.round_dp == "none" and cfg.strategy != "centralized":
        uncovered.append("the training rounds' updates (round-dp = 'none')")
    if cfg.strategy != "fgl":
        return uncovered
    if not cfg.secure_histograms:
        uncovered.append("the label histogram, sent in the clear")
    if not cfg.embedding_noise and cfg.prompt_mode in ("instance", "learned"):
        uncovered.append(f"the {cfg.prompt_mode}-level embeddings, sent without noise")
    if cfg.generator_adaptation != "none" and not cfg.adaptation_noise:
        uncovered.append("the adapters, trained without DP-SGD")
    if cfg.oneshot_selection == "federated":
        uncovered.append("each silo's accuracy of the one-shot candidates on its training images")
    return uncovered
