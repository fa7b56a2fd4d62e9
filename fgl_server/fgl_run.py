"""An FGL run on the server: adapt -> embed -> synthesize -> one-shot -> rounds (`run_fgl`),
with what its phases need: the store's manifest, the synthetic set as training reads it, and
the server's trainers on it (FGL's fine-tune, `synthetic-trust`'s update, a baseline's
`trusted-store`). Round 0's limits and checks are `fgl_server.embedding_round`'s."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fgl_core.adapted_generator import adapter_record
from fgl_core.config import ConfigError, RunConfig
from fgl_core.datasets import DatasetSplits, ImageSet
from fgl_core.domain_prompts import (
    DomainPrompt,
    DomainPromptsError,
    load_domain_prompts,
)
from fgl_core.models import build_model_for, state_dict_float32
from fgl_core.payload import (
    EmbeddingPayload,
)
from fgl_core.plotting import plot_samples
from fgl_core.run_results import Evaluation, OneShotSelection, ResultsError
from fgl_core.seeds import derive_seed
from fgl_core.training import TrainSettings, train_model
from fgl_server.adaptation import adapt_generator
from fgl_server.budget import privacy_budget
from fgl_server.checkpoint import load_checkpoint, save_checkpoint, save_state
from fgl_server.checkpoint import load_state as load_checkpointed
from fgl_server.embedding_round import embedding_round, payload_limits, summed_histograms
from fgl_server.evaluation import evaluate_on_server
from fgl_server.ledger import RecordingGrid
from fgl_server.replies import ReplyCheck
from fgl_server.results import RunRecorder
from fgl_server.rounds import run_rounds
from fgl_server.selection import candidate_epochs, select_candidate
from fgl_server.synthesis import SynthesisEngine, SynthesisSettings
from fgl_server.synthesis_plan import merge_payloads, plan_images
from fgl_server.synthesis_pool import check_workers_fit, pool_for
from fgl_server.synthetic_store import (
    ShardStream,
    StoreError,
    SyntheticStore,
    synthesize_into_store,
)
from strategies.build import build_strategy

log = logging.getLogger(__name__)
CANDIDATES_PHASE = "one-shot-candidates"  # the checkpoint of the candidates the silos choose from


def run_fgl(
    grid: RecordingGrid,
    cfg: RunConfig,
    data: DatasetSplits,
    recorder: RunRecorder,
    device: torch.device,
) -> nn.Module:
    """Run FGL on the server; return the final global model.

    0. adapt (with `generator-adaptation`): rounds in which the silos train adapters of the
       generator on their images, averaged by the server (`fgl_server.adaptation`).
    1. embed: every silo is asked once for its embedding payload; each reply passes the
       boundary (`accept_payload`) or is rejected by name, and the run goes on with the others.
       With `secure-histograms`, the accepted silos' label histograms are then summed by
       Flower's SecAgg+ (`fgl_server.secure_histogram`).
    2. synthesize: the accepted payloads are merged and planned into images, and the store makes
       those it lacks (a rerun reuses every finished shard).
    3. one-shot: a fresh global model is trained on the synthetic set alone (with
       `oneshot-selection = "federated"`, the silos choose its epoch: `fgl_server.selection`).
    4. rounds: FedAvg on the silos' real data from the one-shot model, the aggregate optionally
       fine-tuned on the synthetic set after each round (`server-finetune-epochs`).

    Each phase is timed, and results.json is rewritten as the run goes, so a run that stops
    keeps what it had done; a rerun of the same run resumes (see `fgl_server.checkpoint`).
    """
    domains = run_domains(cfg, data)
    check_workers_fit(cfg.synthesis_workers, cfg.synthesis_ray_address, device.type)
    adapter = (
        adapt_generator(grid, cfg, data.class_names, recorder, device)
        if cfg.generator_adaptation == "lora"
        else None
    )
    settings = SynthesisSettings.from_config(
        cfg,
        train_resolution=data.image_size,
        domain_negatives=tuple(d.negative for d in domains),
        adapter=str(adapter.folder) if adapter else "",
        adapter_digest=adapter.digest if adapter else "",
    )
    engine = SynthesisEngine.load(settings, cfg.cache_dir, device)
    limits = payload_limits(cfg, engine, data.class_names, domains)
    with recorder.phase("embed"):
        round0 = embedding_round(grid, cfg, limits, domains,
                                 adapter_record(adapter.state) if adapter else None)  # fmt: skip
    recorder.set("embedding", round0.record)
    payloads, histogram = round0.payloads, None
    if not payloads:
        raise RuntimeError(f"no silo sent a usable embedding payload: {round0.record['rejected']}")
    if cfg.secure_histograms:
        with recorder.phase("secure-histograms"):
            histogram, summed = summed_histograms(grid, cfg, round0, data.num_classes)
        recorder.set("secure-histograms", summed)
    recorder.set("privacy", privacy_budget(cfg, recorder.results))
    synthetic, made = synthesize(engine, payloads, histogram, cfg, data, recorder)
    recorder.set("synthesis", made)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, evaluation, selection = one_shot(synthetic, cfg, data, recorder, device,
                                            ReplyCheck(grid, data.class_names))  # fmt: skip
    if selection is not None:
        recorder.set(OneShotSelection.KEY, selection.to_json())
    recorder.set(Evaluation.KEY, evaluation.to_json())
    if cfg.num_server_rounds == 0:
        recorder.log_round(0, evaluation.to_json())
        recorder.set("traffic", grid.to_json())
        return model
    finetune = (
        synthetic_trainer(synthetic, model, cfg, recorder, device, cfg.server_finetune_epochs,
                          "server-finetune")
        if cfg.server_finetune_epochs
        else None
    )  # fmt: skip
    trusted = (
        synthetic_trainer(synthetic, model, cfg, recorder, device, cfg.local_epochs,
                          "server-update")
        if cfg.aggregation == "synthetic-trust"
        else None
    )  # fmt: skip
    strategy = build_strategy(cfg, finetune_fn=finetune, server_update_fn=trusted)
    return run_rounds(strategy, grid, model, cfg, data, recorder, device, await_nodes=False)


def run_domains(cfg: RunConfig, data: DatasetSplits) -> list[DomainPrompt]:
    """`domain-prompts`, checked before any silo is asked: every domain of the server's own
    data must have its entry (the silos check theirs when they build their prompts)."""
    if not cfg.domain_prompts:
        return []
    try:
        domains = load_domain_prompts(cfg.domain_prompts, cfg.prompt_mode)
    except DomainPromptsError as err:
        raise ConfigError(f"domain-prompts: {err}") from None
    for domain in domains:
        template = domain.template or cfg.effective_prompt_template
        if domain.style and "{style}" not in template:
            raise ConfigError(
                f"domain-prompts: domain {domain.name!r} has the style {domain.style!r}, but its "
                f"template {template!r} has no {{style}} to put it in"
            )
    named = {d.name for d in domains}
    missing = [d for d in data.domain_names if d not in named]
    if missing:
        raise ConfigError(
            f"domain-prompts {cfg.domain_prompts!r} names {[d.name for d in domains]}; the "
            f"dataset's domains {missing} have no entry"
        )
    return domains


def synthesize(
    engine: SynthesisEngine,
    payloads: dict[str, EmbeddingPayload],
    secure_histogram: list[int] | None,
    cfg: RunConfig,
    data: DatasetSplits,
    recorder: RunRecorder,
) -> tuple[ImageSet | ShardStream, dict]:
    """Phase 2: deduplicate, plan, make the images the store lacks; the synthetic set, and what
    was made (results.json's `synthesis`)."""
    prompts, histogram = merge_payloads(
        payloads, data.num_classes, cfg.max_silo_share, secure_histogram, cfg.synthesis_plan
    )
    jobs = plan_images(prompts, histogram, cfg.images_per_class, cfg.synthesis_plan, cfg.seed,
                       every_class=secure_histogram is not None)  # fmt: skip
    batch = cfg.synthesis_batch_size
    store = SyntheticStore.for_plan(Path(cfg.cache_dir) / "synthetic", engine, prompts, jobs,
                                    batch, cfg.synthesis_shard_size)  # fmt: skip
    with recorder.phase("synthesize"):
        stats = synthesize_into_store(engine, prompts, jobs, store, batch,
                                      start_pool=pool_for(engine, cfg),
                                      progress_every=cfg.progress_seconds,
                                      report=recorder.progress)  # fmt: skip
    synthetic, labels, samples = training_set(store, cfg, engine.device)
    plot_samples(samples, data.class_names, recorder.dir / "synthetic_samples.png")
    made = {
        **stats,
        "prompts": len(prompts),
        "merged-label-histogram": histogram,
        "images-per-class": np.bincount(labels, minlength=data.num_classes).tolist(),
        "store": str(store.dir),
    }
    return synthetic, made


def training_set(
    store: SyntheticStore, cfg: RunConfig, device: torch.device
) -> tuple[ImageSet | ShardStream, np.ndarray, ImageSet]:
    """The synthetic set as training reads it (whole on the device, or streamed through
    `synthetic-buffer-shards` shards), its labels, and images of every class to plot."""
    if not cfg.synthetic_buffer_shards:
        whole = store.load()
        return whole, whole.labels, whole
    labels = np.asarray(store.plan["labels"], np.int64)
    firsts = sorted({store.shard_of(int(np.argmax(labels == c))) for c in np.unique(labels)})
    return (
        ShardStream(store, device, cfg.synthetic_buffer_shards),
        labels,
        store.load_shards(firsts),
    )


def one_shot(
    synthetic: ImageSet | ShardStream,
    cfg: RunConfig,
    data: DatasetSplits,
    recorder: RunRecorder,
    device: torch.device,
    check: ReplyCheck,
) -> tuple[nn.Module, Evaluation, OneShotSelection | None]:
    """Phase 3: a fresh global model trained on the synthetic set alone (or its checkpoint);
    with `oneshot-selection = "federated"`, the epoch the silos choose (`fgl_server.selection`,
    their replies read through `check`). The model, its central evaluation and the choice."""
    model = build_model_for(cfg, data.num_classes, data.image_size)
    federated = cfg.oneshot_selection == "federated"
    kept = candidate_epochs(cfg.oneshot_epochs, cfg.oneshot_candidates) if federated else []
    candidates: dict[int, dict[str, torch.Tensor]] = {}
    selection: OneShotSelection | None = None
    curve: list[dict[str, float]] = []  # this attempt's evaluations, the last after the last epoch
    with recorder.phase("one-shot"):
        if federated:
            candidates = load_candidates(recorder, model, kept, cfg.oneshot_epochs)
            trained = bool(candidates)
        else:
            trained = bool(load_checkpoint(recorder.dir, "one-shot", model, recorder.fingerprint,
                                           max(1, cfg.oneshot_epochs)))  # fmt: skip
        if trained:
            log.info("one-shot: the model trained before is reused")
        elif cfg.oneshot_epochs:
            seed = derive_seed(cfg.seed, "one-shot")
            settings = TrainSettings.on_synthetic(cfg, cfg.oneshot_epochs, seed)

            def evaluate_epoch(epoch: int, loss: float) -> None:
                if epoch in kept:
                    candidates[epoch] = state_dict_float32(model)
                every = cfg.oneshot_eval_every
                if every and (epoch % every == 0 or epoch == cfg.oneshot_epochs):
                    metrics = evaluate_on_server(model, data, device, cfg)
                    curve.append({"epoch": epoch, "train-loss": loss, **metrics})
                    recorder.set("one-shot-curve", curve)

            train_model(
                model,
                synthetic,
                settings,
                device,
                desc="one-shot",
                on_epoch=evaluate_epoch,
                report=recorder.progress,
            )
            if federated:
                save_state(recorder.dir, CANDIDATES_PHASE, cfg.oneshot_epochs,
                           flat_candidates(candidates), recorder.fingerprint)  # fmt: skip
            else:
                save_checkpoint(
                    recorder.dir, "one-shot", cfg.oneshot_epochs, model, recorder.fingerprint
                )
    if federated:
        selection = choose_epoch(check, kept, candidates, cfg, recorder)
        model.load_state_dict(candidates[selection.chosen_epoch])
        metrics = evaluate_on_server(model, data, device, cfg)
    elif curve:  # the last epoch was just evaluated
        metrics = {k: v for k, v in curve[-1].items() if k not in ("epoch", "train-loss")}
    else:
        metrics = evaluate_on_server(model, data, device, cfg)
    evaluation = Evaluation.from_json(metrics)
    log.info("one-shot: test accuracy %.4f (val %.4f)", evaluation.test_accuracy,
             evaluation.val_accuracy)  # fmt: skip
    return model, evaluation, selection


def flat_candidates(candidates: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The candidates as one state dict (`epoch-<e>/<name>`), as their checkpoint holds them."""
    return {f"epoch-{e}/{k}": v for e, state in candidates.items() for k, v in state.items()}


def load_candidates(
    recorder: RunRecorder, model: nn.Module, kept: list[int], epochs: int
) -> dict[int, dict[str, torch.Tensor]]:
    """The one-shot candidates a run that stopped had trained (their checkpoint), or none."""
    like = model.state_dict()
    expected = flat_candidates({e: like for e in kept})
    _, saved = load_checkpointed(recorder.dir, CANDIDATES_PHASE, expected, recorder.fingerprint,
                                 epochs)  # fmt: skip
    if saved is None:
        return {}
    return {e: {k: saved[f"epoch-{e}/{k}"] for k in like} for e in kept}


def choose_epoch(
    check: ReplyCheck,
    kept: list[int],
    candidates: dict[int, dict[str, torch.Tensor]],
    cfg: RunConfig,
    recorder: RunRecorder,
) -> OneShotSelection:
    """The silos' choice (`fgl_server.selection`), or the one a resumed run had recorded for
    the same candidates (results.json's `one-shot-selection`)."""
    try:
        earlier = OneShotSelection.read(recorder.results)
    except ResultsError as err:
        log.warning("one-shot selection: the choice recorded before is not used (%s)", err)
        earlier = None
    if earlier is not None and earlier.epochs == kept and earlier.chosen_epoch in kept:
        log.info("one-shot selection: epoch %d, as chosen before", earlier.chosen_epoch)
        return earlier
    with recorder.phase("one-shot-selection"):
        selection = select_candidate(check, kept, [candidates[e] for e in kept],
                                     cfg.max_silo_share, cfg.round_timeout)  # fmt: skip
    return selection.record


def trusted_set(cfg: RunConfig, data: DatasetSplits, recorder: RunRecorder) -> ImageSet:
    """`trusted-store`: a previous FGL run's synthetic set as a baseline's trusted data for
    `synthetic-trust`, every shard verified, checked to be of this dataset's classes and image
    size; a bad store is a `ConfigError` naming it, before any silo is asked."""
    where = f"trusted-store {cfg.trusted_store!r}"
    try:
        synthetic = SyntheticStore.open(cfg.trusted_store).load()
    except StoreError as err:
        raise ConfigError(f"{where}: {err}") from None
    size, labels = synthetic.images.shape[1:3], synthetic.labels
    if tuple(size) != (data.image_size, data.image_size):
        raise ConfigError(
            f"{where}: its images are {size[0]}x{size[1]} px, this dataset's "
            f"{data.image_size} px (a store of another dataset?)"
        )
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= data.num_classes:
        raise ConfigError(
            f"{where}: its labels do not fit this dataset's {data.num_classes} classes"
        )
    recorder.set("trusted-store", {"store": cfg.trusted_store, "images": len(labels)})
    log.info("%s: %d synthetic images as the server's trusted data", where, len(labels))
    return synthetic


def synthetic_trainer(
    synthetic: ImageSet | ShardStream,
    like: nn.Module,
    cfg: RunConfig,
    recorder: RunRecorder,
    device: torch.device,
    epochs: int,
    purpose: str,
) -> Callable[[int, ArrayRecord], ArrayRecord]:
    """Phase 4's training on the synthetic set: given a round and a model's arrays, those
    trained `epochs` epochs on it, on a model of its own (the central evaluation has another);
    `purpose` names the phase and the seed (`server-finetune`: FGL's fine-tune of each
    aggregate; `server-update`: the trusted update of `aggregation = "synthetic-trust"`)."""
    model = copy.deepcopy(like)

    def train(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        seed = derive_seed(cfg.seed, purpose, server_round)
        settings = TrainSettings.on_synthetic(cfg, epochs, seed)
        with recorder.phase(purpose):
            train_model(model, synthetic, settings, device, desc=f"{purpose} round {server_round}")
        return ArrayRecord(state_dict_float32(model))

    return train
