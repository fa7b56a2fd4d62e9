"""What a silo does with each message: embed its prompts, train and evaluate on its own data.

`fgl_client.app` routes each message here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fgl_client.adaptation import adapt as adapt_generator
from fgl_client.embedding import embed_silo, keep_for_chunks, kept_chunk
from fgl_client.learned import ClassEmbeddingLearner
from fgl_client.objectives import fedprox_loss, moon_loss
from fgl_client.silo import Silo, open_silo
from fgl_core.class_list import DIGESTS_KEY, name_digests
from fgl_core.config import RunConfig
from fgl_core.console import configure_logging
from fgl_core.models import Classifier, build_model, state_dict_float32
from fgl_core.payload import (
    ADAPTER_RECORD,
    CANDIDATE_RECORD,
    REQUEST_RECORD,
    SELECT_MESSAGE_TYPE,
    SILO_RECORD,
    SUMMARY_RECORD,
    ChunkRequest,
    EmbedRequest,
)
from fgl_core.pretrained import ModelRefError
from fgl_core.seeds import derive_seed
from fgl_core.training import (
    InputSettings,
    LossFn,
    TrainSettings,
    cross_entropy,
    evaluate_model,
    pick_device,
    train_model,
)

MOON_PREVIOUS = "moon-previous-model"
log = logging.getLogger(__name__)


class SiloModelUnusable(RuntimeError):
    """What the server hears when a silo cannot load a model the run names: which models it
    named, not why, and not whether a path it named exists on the silo."""


def _setup(msg: Message, context: Context) -> tuple[RunConfig, Silo, Classifier]:
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    silo = open_silo(cfg, context.node_config)
    return cfg, silo, _model(cfg, silo, msg.content["arrays"])


def _model(cfg: RunConfig, silo: Silo, arrays: ArrayRecord) -> Classifier:
    """The global model the server sent as `arrays`, for this silo's data."""
    state = arrays.to_torch_state_dict()
    num_classes = int(state["head.weight"].shape[0])  # the federation's, not only this silo's
    if silo.num_classes > num_classes:
        raise ValueError(
            f"silo {silo.name!r} has {silo.num_classes} classes ({silo.class_names}) but the "
            f"global model has {num_classes}: a silo's labels must be the federation's"
        )
    input_size = cfg.model_input_size(silo.image_size)
    model = build_model(cfg.model, num_classes, input_size, projection_dim=cfg.projection_dim)
    model.load_state_dict(state)
    return model


def _silo_record(silo: Silo, cfg: RunConfig) -> ConfigRecord:
    record = ConfigRecord(
        {
            "partition-id": silo.partition_id,
            "num-train": len(silo.train),
            "num-test": len(silo.test),
            DIGESTS_KEY: name_digests(silo.class_names),
        }
    )
    if not cfg.secure_histograms:  # else the server learns the histograms only as their sum
        record["label-histogram"] = silo.train.label_histogram(silo.num_classes)
    return record


def embed(msg: Message, context: Context) -> Message:
    """Round 0: answer the server's embed request with the silo's embedding payload."""
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    request = EmbedRequest.from_record(msg.content[REQUEST_RECORD])
    start = time.perf_counter()
    silo = open_silo(cfg, context.node_config)
    learner = None
    if request.prompt_mode == "learned":
        adapter = msg.content.array_records.get(ADAPTER_RECORD)
        adapter_state = {k: v.numpy() for k, v in adapter.items()} if adapter else None
        salt = silo.partition_id if silo.partition_id >= 0 else context.node_id % 1_000_003
        learner = ClassEmbeddingLearner(cfg, request, silo, adapter_state, salt)
    try:
        payload = embed_silo(request, silo, cfg.cache_dir, str(pick_device(cfg.device)), learner)
    except ModelRefError as err:  # the refs are the server's choice: its reply says no more
        log.error("a model the run names cannot be loaded here: %s", err)
        models = f"generator {request.generator!r}"
        models += f", text-encoder {request.text_encoder!r}" if request.text_encoder else ""
        models += f", captioner {request.captioner!r}" if request.prompt_mode == "instance" else ""
        raise SiloModelUnusable(
            f"a model the run names ({models}) cannot be loaded on this silo (the silo's log "
            "says why)"
        ) from None
    if payload.num_chunks(request.chunk_bytes) > 1:  # the server asks for the rest by digest
        keep_for_chunks(payload, cfg.cache_dir, context.node_id)
    content = payload.to_records(request.chunk_bytes)
    content[SUMMARY_RECORD]["embed-seconds"] = time.perf_counter() - start  # this silo's compute
    return Message(content=content, reply_to=msg)


def adapt(msg: Message, context: Context) -> Message:
    """Before round 0: a round of adapting the generator on this silo's images."""
    try:
        return adapt_generator(msg, context)
    except ModelRefError as err:  # the generator is the server's choice: its reply says no more
        log.error("the generator the run names cannot be loaded here: %s", err)
        generator = context.run_config.get("generator", "fgl-mini")
        raise SiloModelUnusable(
            f"a model the run names (generator {generator!r}) cannot be loaded on this silo "
            "(the silo's log says why)"
        ) from None


def embed_chunk(msg: Message, context: Context) -> Message:
    """Chunk k >= 1 of the payload this silo sent chunk 0 of (see `fgl_core.payload`)."""
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    request = ChunkRequest.from_content(msg.content)
    return Message(content=kept_chunk(request, cfg.cache_dir, context.node_id), reply_to=msg)


def _local_objective(
    config: ConfigRecord, model: Classifier, state: RecordDict
) -> tuple[LossFn, dict[str, float]]:
    """Cross-entropy, or the term the strategy asked for in the train config."""
    if "proximal-mu" in config:
        return fedprox_loss(model, float(config["proximal-mu"])), {}  # type: ignore[arg-type]
    if "moon-mu" in config:
        has_previous = MOON_PREVIOUS in state
        previous = state[MOON_PREVIOUS].to_torch_state_dict() if has_previous else None
        loss = moon_loss(
            model,
            previous,
            float(config["moon-mu"]),  # type: ignore[arg-type]
            float(config["moon-temperature"]),  # type: ignore[arg-type]
        )
        return loss, {"moon-has-previous": float(has_previous)}
    return cross_entropy, {}


def train(msg: Message, context: Context) -> Message:
    cfg, silo, model = _setup(msg, context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    silo_salt = silo.partition_id if silo.partition_id >= 0 else context.node_id % 1_000_003
    seed = derive_seed(cfg.seed, "silo-train", silo_salt, server_round)
    settings = TrainSettings.from_config(cfg, epochs=cfg.local_epochs, seed=seed)
    loss_fn, objective_metrics = _local_objective(config, model, context.state)
    received = {}
    if cfg.evaluate_in_train:  # the global model as received, before this round changes it
        before = evaluate_model(model, silo.test, pick_device(cfg.device), settings)
        received = {"eval-loss": float(before.loss), "eval-accuracy": float(before.accuracy)}
    stats = train_model(
        model,
        silo.train,
        settings,
        pick_device(cfg.device),
        desc=f"{silo.name} round {server_round}",
        loss_fn=loss_fn,
    )
    if "moon-mu" in config:  # kept by the node between rounds, across fresh ClientApp processes
        context.state[MOON_PREVIOUS] = ArrayRecord(state_dict_float32(model))
    metrics = MetricRecord(
        {
            "train-loss": float(stats.loss),
            "samples-per-second": float(stats.samples_per_second),
            "train-seconds": float(stats.seconds),
            "num-examples": int(stats.num_examples),
            **objective_metrics,
            **received,
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state_dict_float32(model)),
            "metrics": metrics,
            SILO_RECORD: _silo_record(silo, cfg),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg, silo, model = _setup(msg, context)
    stats = evaluate_model(
        model, silo.test, pick_device(cfg.device), InputSettings.from_config(cfg)
    )
    metrics = MetricRecord(
        {
            "eval-loss": float(stats.loss),
            "eval-accuracy": float(stats.accuracy),
            "num-examples": int(stats.num_examples),
        }
    )
    silo_record = ConfigRecord({DIGESTS_KEY: name_digests(silo.class_names)})
    return Message(content=RecordDict({"metrics": metrics, SILO_RECORD: silo_record}), reply_to=msg)


def select(msg: Message, context: Context) -> Message:
    """Each one-shot candidate's accuracy on this silo's training images, which none of them saw
    (they were trained on synthetic images alone): `fgl_server.selection`."""
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    silo = open_silo(cfg, context.node_config)
    epochs = list(msg.content["config"]["epochs"])
    if len(epochs) > cfg.oneshot_candidates:
        raise ValueError(f"{len(epochs)} one-shot candidates asked for; the run keeps at most "
                         f"{cfg.oneshot_candidates}")  # fmt: skip
    device, inputs = pick_device(cfg.device), InputSettings.from_config(cfg)
    accuracy = []
    for k, epoch in enumerate(epochs):
        model = _model(cfg, silo, msg.content[CANDIDATE_RECORD.format(k)])
        accuracy.append(float(evaluate_model(model, silo.train, device, inputs).accuracy))
        log.info("%s: the one-shot model of epoch %s: %.4f on %d training images", silo.name,
                 epoch, accuracy[-1], len(silo.train))  # fmt: skip
    metrics = MetricRecord({"select-accuracy": accuracy, "num-examples": len(silo.train)})
    silo_record = ConfigRecord({DIGESTS_KEY: name_digests(silo.class_names)})
    return Message(content=RecordDict({"metrics": metrics, SILO_RECORD: silo_record}), reply_to=msg)


HANDLERS: dict[str, Callable[[Message, Context], Message]] = {
    "query.adapt": adapt,
    SELECT_MESSAGE_TYPE: select,
    "query.embed": embed,
    "query.embed_chunk": embed_chunk,
    "train": train,
    "evaluate": evaluate,
}
