"""A silo's privacy budget, composed by Google's dp-accounting instead of hand-written formulas.

What reaches the server from a silo's images, as dp-accounting's `DpEvent`s about one image:

- a noised embedding (`embedding-clip`, `embedding-noise`): one Gaussian mechanism whose noise
  is `embedding-noise` times its sensitivity (`fgl_core.dp`); an image is behind at most one
  embedding (its caption's at instance level; at class level the public template's, sent only
  if the silo holds the class), so one `GaussianDpEvent` per run;
- the adaptation rounds under DP-SGD (`adaptation-noise`): per trained part (the UNet's adapter,
  the decoder), `steps` Poisson-sampled Gaussian steps at the sampling rate Opacus uses;
- the training rounds under `round-dp`: one Gaussian mechanism per round about the silo's whole
  update (so about any one image in it), its multiplier against the silo's weight in the mean
  (`strategies.private`).

Composed by privacy loss distributions (`PLDAccountant`, pessimistic estimate): one release
gets the analytic Gaussian's exact value, and a composition a bound tighter than Renyi DP's
(Opacus' own accountant; below it by 7-13 % for this project's DP-SGD histories, measured in
the tests). What no mechanism covers (the label histogram sent in the clear, training rounds
without DP) is named beside the figure by the caller (`fgl_server.budget`), never folded into it.
"""

from __future__ import annotations

from collections.abc import Sequence

import dp_accounting as dpa

PLD_INTERVAL = 1e-3  # the privacy loss's grid: finer is tighter and slower (3,000 steps: 0.6 s)


def gaussian_release(noise_multiplier: float) -> dpa.DpEvent:
    """One Gaussian mechanism with noise `noise_multiplier` x its sensitivity."""
    return dpa.GaussianDpEvent(noise_multiplier)


def dp_sgd(history: Sequence[tuple[float, float, int]]) -> dpa.DpEvent:
    """DP-SGD as Opacus records it: (noise multiplier, sample rate, steps) per stretch of
    training, each a run of Poisson-sampled Gaussian steps."""
    return dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(noise)), int(steps)
            )
            for noise, rate, steps in history
            if steps > 0
        ]
    )


def epsilon(events: Sequence[dpa.DpEvent], delta: float) -> float:
    """The epsilon at `delta` of `events` composed, by privacy loss distributions; 0.0 for
    no events."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    events = [e for e in events if not _empty(e)]
    if not events:
        return 0.0
    accountant = dpa.pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def _empty(event: dpa.DpEvent) -> bool:
    return isinstance(event, dpa.ComposedDpEvent) and all(_empty(e) for e in event.events)


def silo_budget(
    delta: float,
    embedding_noise: float,
    adaptation: Sequence[tuple[float, float, int]],
    rounds: Sequence[float] = (),
) -> dict:
    """One silo's budget for a run: each part's epsilon at `delta` and all of them composed
    (None where nothing was noised: no guarantee is claimed, not a perfect one).
    `embedding_noise`: the multiplier of its noised embeddings (0: none sent noised);
    `adaptation`: its DP-SGD history (empty: none); `rounds`: the multiplier of each noised
    release of the training rounds it was aggregated in (empty: none)."""
    events, parts = {}, {}
    if embedding_noise:
        events["embedding"] = gaussian_release(embedding_noise)
    if adaptation:
        events["adaptation"] = dp_sgd(adaptation)
    if rounds:
        events["rounds"] = dpa.ComposedDpEvent([gaussian_release(z) for z in rounds])
    for name, event in events.items():
        parts[name] = epsilon([event], delta)
    composed = epsilon(list(events.values()), delta) if events else None  # None: no guarantee
    return {"delta": delta, "parts": parts, "epsilon": composed}
