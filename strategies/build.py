"""The strategy a run config names, built in one place with everything it needs."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg, FedProx

from fgl_core.config import RunConfig
from strategies.fedopt import FedAdamFloat32
from strategies.fgl import FGL
from strategies.moon import MOON


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
    cfg: RunConfig, finetune_fn: Callable[[int, ArrayRecord], ArrayRecord] | None = None
) -> FedAvg:
    """FedAvg, FedOpt (Flower's FedAdam), FedProx (Flower's), MOON or FGL's rounds (ours).

    `finetune_fn` is FGL's server-side fine-tune of each aggregated model (None: off).
    """
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
