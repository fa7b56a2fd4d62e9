"""Learned class embeddings on a silo (`prompt-mode = "learned"`): each class prompt's embedding,
optimized against the generator's denoising loss on the silo's images of that class.

The generator is the run's, with the federation's adapter when the run adapted it (the server
sends the adapter beside the embed request, so every silo learns against the generator the
server will synthesize with). The learning itself is `fgl_core.learned_prompts`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fgl_client.adaptation import pipeline
from fgl_client.silo import Silo
from fgl_core.adapted_generator import adapter_settings, encode_images, load_state
from fgl_core.config import RunConfig
from fgl_core.learned_prompts import learn_class_embedding
from fgl_core.payload import EmbedRequest
from fgl_core.pretrained import resolve_model_ref
from fgl_core.seeds import derive_seed

log = logging.getLogger(__name__)


class ClassEmbeddingLearner:
    """`learner(embeds, labels)` for `fgl_client.embedding.build_payload`: each row's class
    embedding learned from that row (the class prompt's encoding) on the silo's images of its
    class; (n, 77, D) float32 out. The generator: the run's with `adapter` set, or `pipe` as
    given."""

    def __init__(
        self,
        cfg: RunConfig,
        request: EmbedRequest,
        silo: Silo,
        adapter: Mapping[str, np.ndarray] | None,
        seed_salt: int,
        pipe: Any = None,
    ) -> None:
        self.cfg, self.request, self.silo, self.seed_salt = cfg, request, silo, seed_salt
        self.adapter, self.given_pipe = adapter, pipe

    def _pipe(self) -> Any:
        if self.given_pipe is not None:  # a generator already set as wanted (the privacy report)
            return self.given_pipe
        ref = resolve_model_ref(self.request.generator, "generator", self.cfg.cache_dir)
        pipe = pipeline(ref, self.cfg.device, adapter_settings(self.cfg))
        if self.adapter is not None:
            load_state(pipe, self.adapter)
        else:  # the stock generator: the adapter attached to the cached pipeline stays at zero
            with torch.no_grad():
                for name, param in pipe.unet.named_parameters():
                    if ".lora_B." in name:
                        param.zero_()
        return pipe

    def __call__(self, embeds: torch.Tensor, labels: list[int]) -> torch.Tensor:
        from diffusers import DDPMScheduler

        pipe = self._pipe()
        _, latents = encode_images(pipe, self.silo.train.images)
        latents = latents * pipe.vae.config.scaling_factor
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        learned = []
        for row, label in enumerate(labels):
            own = torch.from_numpy(np.flatnonzero(self.silo.train.labels == label))
            seed = derive_seed(self.cfg.seed, "learned-prompt", self.seed_salt, label)
            start = embeds[row].to(latents.device, torch.float32)
            embedding, losses = learn_class_embedding(
                pipe.unet, latents[own], start, schedule, self.request.learned_steps,
                lr=self.request.learned_lr, seed=seed,
            )  # fmt: skip
            moved = float(torch.linalg.norm(embedding - start) / torch.linalg.norm(start))
            log.info("%s: class %d learned from %d images, loss %.4f -> %.4f, moved %.3f of its "
                     "prompt's norm", self.silo.name, label, len(own), np.mean(losses[:10]),
                     np.mean(losses[-10:]), moved)  # fmt: skip
            learned.append(embedding.cpu())
        return torch.stack(learned) if learned else embeds
