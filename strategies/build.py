"""The strategy a run config names, built in one place with everything it needs."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fgl_core.config import RunConfig
from strategies.fedopt import FedAdamFloat32
from strategies.fgl import FGL
from strategies.fltrust import SyntheticTrust
from strategies.moon import MOON
from strategies.private import CentralDP, PrivateRounds
from strategies.robust import RobustAggregation


def sampling(cfg: RunConfig) -> dict:
    """Sampling settings every strategy shares.

    `min-nodes` is waited for once, before the first round (`wait_for_nodes`); Flower's own
    `min_available_nodes` would wait forever in every later round for a silo that went away,
    so each round goes on with the nodes still connected.
    """
    return {
        "fraction_train": cfg.fraction_train,
        # with evaluate-in-train the silos report their evaluation in the train reply
        "fraction_evaluate": 0.0 if cfg.evaluate_in_train else cfg.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }


def build_strategy(
    cfg: RunConfig,
    finetune_fn: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
    server_update_fn: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
) -> Strategy:
    """FedAvg, FedOpt (Flower's FedAdam), FedProx (Flower's), MOON or FGL's rounds (ours), their
    training replies aggregated by the run's `aggregation` (`strategies.robust`,
    `strategies.fltrust`).

    `finetune_fn` is FGL's server-side fine-tune of each aggregated model (None: off);
    `server_update_fn` trains a global model on the synthetic set (`synthetic-trust`).
    With `round-dp`, Flower's client-side DP wrapper noises the mean (`strategies.private`),
    FGL's fine-tune after the noise.
    """
    if cfg.round_dp != "none":
        return PrivateRounds(private_rule(cfg, _strategy(cfg, None)), finetune_fn)
    strategy = _strategy(cfg, finetune_fn)
    if cfg.aggregation == "fedavg":
        return strategy
    if cfg.aggregation == "synthetic-trust":
        if server_update_fn is None:
            raise ValueError("aggregation 'synthetic-trust' needs the server's update function")
        return SyntheticTrust(strategy, server_update_fn)
    return RobustAggregation(strategy, robust_rule(cfg), cfg.aggregation)


def _strategy(
    cfg: RunConfig, finetune_fn: Callable[[int, ArrayRecord], ArrayRecord] | None
) -> FedAvg:
    if cfg.strategy == "fedopt":
        optimizer = {"eta": cfg.server_lr, "eta_l": cfg.lr, "tau": cfg.server_tau}
        betas = {"beta_1": cfg.server_beta1, "beta_2": cfg.server_beta2}
        return FedAdamFloat32(**sampling(cfg), **optimizer, **betas)
    if cfg.strategy == "fedprox":
        return FedProx(**sampling(cfg), proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "moon":
        return MOON(mu=cfg.moon_mu, temperature=cfg.moon_temperature, **sampling(cfg))
    if cfg.strategy == "fgl":
        return FGL(finetune_fn=finetune_fn, **sampling(cfg))
    return FedAvg(**sampling(cfg))


def private_rule(cfg: RunConfig, strategy: FedAvg) -> CentralDP:
    """Flower's client-side DP wrapper for `cfg.round_dp` around `strategy`; the silos a round
    samples of `min-nodes` are expected to reply (fewer make the noise larger against each, as
    `strategies.private` accounts it)."""
    sampled = max(1, int(cfg.fraction_train * cfg.min_nodes))  # as Flower's FedAvg samples
    if cfg.round_dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, cfg.round_dp_noise, cfg.round_dp_clip, sampled
        )
    # the clipped count's noise: Flower's default (n / 20) unless the multiplier needs more
    # (Andrew et al.: z must stay below twice its standard deviation)
    count_noise = max(sampled / 20, cfg.round_dp_noise)
    return DifferentialPrivacyClientSideAdaptiveClipping(
        strategy,
        cfg.round_dp_noise,
        sampled,
        initial_clipping_norm=cfg.round_dp_clip,
        target_clipped_quantile=cfg.round_dp_quantile,
        clipped_count_stddev=count_noise,
    )


def robust_rule(cfg: RunConfig) -> FedAvg:
    """Flower's strategy for `cfg.aggregation` with the run's parameters."""
    f = cfg.aggregation_malicious
    if cfg.aggregation == "median":
        return FedMedian()
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trimmed_beta)
    if cfg.aggregation == "krum":
        return Krum(num_malicious_nodes=f)
    if cfg.aggregation == "multi-krum":
        return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=cfg.aggregation_select)
    if cfg.aggregation == "bulyan":
        return Bulyan(num_malicious_nodes=f)
    raise ValueError(f"aggregation {cfg.aggregation!r} is not one of Flower's robust rules")
