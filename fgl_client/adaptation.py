"""A silo's round of adapting the generator: the server's adapter in, this silo's out.

The silo loads the generator (the run's `generator`, as it does to embed), sets the adapter the
server sent, trains it on its own training images, each conditioned on the prompt the silo sends
for it at round 0 (`conditioning`), and replies with the trained adapter and its number of
images (`fgl_core.adapted_generator` says what adapts and how).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fgl_client.embedding import captioner, silo_prompts
from fgl_client.silo import Silo, open_silo
from fgl_core.adapted_generator import (
    AdaptSettings,
    adapt_on_silo,
    adapter_record,
    adapter_settings,
    encode_texts,
    load_pipeline,
    load_state,
    prepare,
    state_of,
)
from fgl_core.class_list import DIGESTS_KEY, name_digests
from fgl_core.config import RunConfig
from fgl_core.console import configure_logging
from fgl_core.payload import SILO_RECORD, EmbedRequest
from fgl_core.pretrained import resolve_model_ref
from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt
from fgl_core.seeds import derive_seed
from fgl_core.training import pick_device

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)  # in simulation one process serves every silo: each message
def pipeline(ref: str, device: str, settings: AdaptSettings) -> Any:  # sets all adapted parts
    """The generator in float32 with the run's adapter attached (B at zero until set), loaded
    once per process."""
    pipe = load_pipeline(ref, pick_device(device))
    prepare(pipe, settings)
    return pipe


def conditioning(pipe: Any, silo: Silo, cfg: RunConfig) -> Any:
    """Each training image's conditioning, encoded by the generator's own text encoder: the
    prompt the silo sends for it at round 0. At class level (and `learned`, which starts from
    it) its class's prompt, in the run's template and style; at instance level the images the
    silo captions for round 0 (the same draw, so the same captions) carry their own prompts,
    and the rest their class's prompt in the paper's class template."""
    labels = silo.train.labels
    instance = cfg.prompt_mode == "instance"
    template = PAPER_TEMPLATE if instance else cfg.effective_prompt_template
    per_image = [class_prompt(template, silo.class_names[int(c)], cfg.prompt_style)
                 for c in labels]  # fmt: skip
    if instance:
        request = EmbedRequest.from_config(cfg)
        device = str(pick_device(cfg.device))
        prompts = silo_prompts(request, silo, lambda: captioner(
            request.captioner, cfg.cache_dir, device, request.caption_max_tokens))  # fmt: skip
        for image, text in zip(prompts.images or [], prompts.texts, strict=True):
            per_image[image] = text
    texts = sorted(set(per_image))  # each distinct prompt encoded once
    row = {text: i for i, text in enumerate(texts)}
    return encode_texts(pipe, texts)[[row[text] for text in per_image]]


def adapt(msg: Message, context: Context) -> Message:
    """One adaptation round on this silo (message type `query.adapt`)."""
    configure_logging()
    cfg = RunConfig.from_flower(context.run_config)
    silo = open_silo(cfg, context.node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    settings = adapter_settings(cfg)
    ref = resolve_model_ref(cfg.generator, "generator", cfg.cache_dir)
    pipe = pipeline(ref, cfg.device, settings)
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    load_state(pipe, received)
    silo_salt = silo.partition_id if silo.partition_id >= 0 else context.node_id % 1_000_003
    seed = derive_seed(cfg.seed, "silo-adapt", silo_salt, server_round)
    done = adapt_on_silo(pipe, silo.train.images, conditioning(pipe, silo, cfg), settings,
                         server_round, seed)  # fmt: skip
    tail = max(1, len(done.unet_losses) // 5)  # the last fifth of the round's steps
    metrics = {
        "num-examples": len(silo.train),
        "adapt-loss": float(np.mean(done.unet_losses[-tail:])),
        "adapt-seconds": float(done.seconds),
    }
    if done.decoder_losses:
        metrics["decoder-loss"] = float(np.mean(done.decoder_losses[-tail:]))
    if done.epsilon is not None:
        metrics["epsilon"] = float(done.epsilon)
    log.info("%s adaptation round %d: loss %.4f, %.1f s%s", silo.name, server_round,
             metrics["adapt-loss"], done.seconds,
             f", epsilon {done.epsilon:.2f}" if done.epsilon is not None else "")  # fmt: skip
    state = state_of(pipe, settings.adapt_decoder)
    content = RecordDict(
        {
            "arrays": adapter_record(state),
            "metrics": MetricRecord(metrics),
            SILO_RECORD: ConfigRecord(
                {"num-train": len(silo.train), DIGESTS_KEY: name_digests(silo.class_names)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)
