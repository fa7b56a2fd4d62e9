"""Prompt -> conditioning exactly as the generator computes it.

SD 2.x conditions on `CLIPTextModel(...).last_hidden_state` of the pipeline's own
`text_encoder`, on ids from its own `tokenizer` (77 tokens, padded with "!" = id 0, truncated).
`TransformersTextEncoder` does exactly what `StableDiffusionPipeline.encode_prompt` does, so its
output passed as `prompt_embeds` gives bit-identical images to `prompt=`.
`OpenClipTextEncoder` computes the same function from open_clip weights (ViT-H-14 through 23 of
its 24 blocks, then `ln_final`) for silos that hold those (`text-encoder = "open_clip:..."`).
A class-conditional generator (DiT) reads no text: `GeneratorClasses` gives each prompt an empty
(77, 0) embedding and each class its id in the generator's own label set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from fgl_core.pretrained import (
    ModelRefError,
    class_ids_for,
    generator_labels,
    load_component,
    resolve_model_ref,
)
from fgl_core.progress import PhaseProgress

ENCODE_BATCH = 64
PROGRESS_SECONDS = 30.0


def batches(prompts: list[str]) -> Iterator[list[str]]:
    """`prompts` in batches of `ENCODE_BATCH`, counted: a silo encoding thousands of captions
    logs a progress line every `PROGRESS_SECONDS` (`fgl_core.progress`)."""
    with PhaseProgress(
        "text encoding", len(prompts), unit="prompts", every=PROGRESS_SECONDS
    ) as progress:
        for i in range(0, len(prompts), ENCODE_BATCH):
            batch = prompts[i : i + ENCODE_BATCH]
            yield batch
            progress.update(len(batch))


class TextEncoder(Protocol):
    width: int
    pooled_width: int  # SDXL's pooled embedding; 0 for encoders that give the sequence alone

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, 77, width) float32 on the CPU."""
        ...

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 77, width) and (N, pooled_width) float32 on the CPU."""
        ...


class SequenceOnly:
    """An encoder whose prompts have no pooled embedding (SD 1.x/2.x)."""

    pooled_width = 0

    def encode(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts), torch.zeros(len(prompts), 0)


class GeneratorClasses(SequenceOnly):
    """A class-conditional generator's (DiT's) side of a silo: no text encoder at all. Its
    prompts are (77, 0) embeddings; what the silo sends is each class's id in the generator's
    label set (model_index.json's `id2label`), which `class_ids` maps its class names to."""

    width = 0

    def __init__(self, generator: str, cache_dir: str | Path) -> None:
        ref = resolve_model_ref(generator, "generator", cache_dir)
        self.generator = generator
        self.id2label = generator_labels(ref)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 77, 0)

    def class_ids(self, class_names: list[str]) -> list[int]:
        return class_ids_for(self.id2label, class_names, f"generator {self.generator!r}")


class XLTextEncoder:
    """SDXL's two text encoders, through the pipeline's own `encode_prompt` (loaded without its
    UNet and VAE): the penultimate hidden states of both, concatenated, and the second's pooled
    projection."""

    def __init__(self, generator: str, cache_dir: str | Path, device: torch.device) -> None:
        from diffusers import StableDiffusionXLPipeline

        ref = resolve_model_ref(generator, "generator", cache_dir)
        self.pipe = load_component(
            StableDiffusionXLPipeline, ref, None, "generator", unet=None, vae=None, scheduler=None
        ).to(device)
        self.device = device
        self.width = int(self.pipe.text_encoder.config.hidden_size) + int(
            self.pipe.text_encoder_2.config.hidden_size
        )
        self.pooled_width = int(self.pipe.text_encoder_2.config.projection_dim)
        check_cross_attention_width(ref, self.width)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_pooled(prompts)[0]

    @torch.no_grad()
    def encode_with_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        sequences, pooled = [], []
        for batch in batches(prompts):
            out = self.pipe.encode_prompt(
                batch,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            sequences.append(out[0].float().cpu())
            pooled.append(out[2].float().cpu())
        if not sequences:
            return torch.empty(0, 77, self.width), torch.empty(0, self.pooled_width)
        return torch.cat(sequences), torch.cat(pooled)


class TransformersTextEncoder(SequenceOnly):
    def __init__(self, generator: str, cache_dir: str | Path, device: torch.device) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        ref = resolve_model_ref(generator, "generator", cache_dir)
        self.tokenizer = load_component(CLIPTokenizer, ref, "tokenizer", "generator tokenizer")
        self.model = load_component(CLIPTextModel, ref, "text_encoder", "generator text encoder")
        self.model.to(device).eval()
        self.device = device
        self.width = int(self.model.config.hidden_size)
        check_cross_attention_width(ref, self.width)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        chunks = []
        for batch in batches(prompts):
            tokens = self.tokenizer(
                batch,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = tokens.attention_mask.to(self.device) if use_mask else None
            out = self.model(tokens.input_ids.to(self.device), attention_mask=mask)[0]
            chunks.append(out.float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 77, self.width)


def check_cross_attention_width(generator: str, width: int) -> None:
    """The embeddings must fit the generator's UNet; a mismatch means a wrong encoder."""
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(generator, subfolder="unet")
    except Exception:  # no UNet config to compare with (e.g. a text-encoder-only directory)
        return
    needed = unet.get("cross_attention_dim")
    if isinstance(needed, int) and needed != width:
        raise ModelRefError(
            f"generator {generator!r}: its text encoder gives width {width}, but its UNet's "
            f"cross-attention width is {needed}; the embeddings would not fit the generator"
        )


class OpenClipTextEncoder(SequenceOnly):
    """An open_clip text tower (a `CLIP` model or a `TextTransformer`), all blocks but the last."""

    def __init__(self, model: nn.Module, device: torch.device, context_length: int = 77) -> None:
        import open_clip

        self.model = model.to(device).eval()
        self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        self.device = device
        self.width = int(model.ln_final.normalized_shape[0])

    @classmethod
    def from_spec(
        cls, spec: str, generator: str, cache_dir: str | Path, device: torch.device
    ) -> OpenClipTextEncoder:
        """`spec` = "open_clip:<arch>:<checkpoint>": an open_clip architecture name (or a model
        config `.json` file) and a local checkpoint file or an open_clip pretrained tag. The
        width must fit the generator's UNet."""
        import open_clip

        _, arch, checkpoint = spec.split(":", 2)
        if arch.endswith(".json"):
            if not Path(arch).is_file():
                raise ModelRefError(f"text-encoder {spec!r}: no model config file {arch!r}")
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        try:
            model = open_clip.create_model(arch, pretrained=checkpoint, weights_only=True)
        except Exception as err:  # an unknown arch, a missing file, a tag it cannot download
            raise ModelRefError(
                f"text-encoder {spec!r}: open_clip cannot build it "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
            ) from None
        encoder = cls(model, device)
        check_cross_attention_width(
            resolve_model_ref(generator, "generator", cache_dir), encoder.width
        )
        return encoder

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        chunks = [self._encode_batch(batch) for batch in batches(prompts)]
        return torch.cat(chunks) if chunks else torch.empty(0, 77, self.width)

    def _encode_batch(self, prompts: list[str]) -> torch.Tensor:
        m = self.model
        ids = self.tokenizer(prompts).to(self.device)
        x = m.token_embedding(ids) + m.positional_embedding
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in m.transformer.resblocks[:-1]:  # SD 2.x takes the penultimate layer
            x = block(x, attn_mask=m.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return m.ln_final(x).float().cpu()


def open_clip_to_transformers(tower: nn.Module):  # -> CLIPTextModel
    """Copy an open_clip text tower into a `CLIPTextModel` with one block fewer (SD 2.x layout).

    The inverse of what SD 2.x's conversion did for ViT-H-14; used to check that both encoders
    agree, and to turn a silo's open_clip weights into a transformers text encoder.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = tower.transformer.resblocks
    width = tower.ln_final.normalized_shape[0]
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks) - 1,
        num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="gelu",
        layer_norm_eps=tower.ln_final.eps,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = CLIPTextModel(config)
    root = "text_model." if hasattr(model, "text_model") else ""  # transformers 4 vs 5
    state = {
        root + "embeddings.token_embedding.weight": tower.token_embedding.weight,
        root + "embeddings.position_embedding.weight": tower.positional_embedding,
        root + "final_layer_norm.weight": tower.ln_final.weight,
        root + "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i, block in enumerate(blocks[:-1]):
        prefix = f"{root}encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        state.update(
            {
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.q_proj.bias": qb,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.k_proj.bias": kb,
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.v_proj.bias": vb,
                prefix + "self_attn.out_proj.weight": block.attn.out_proj.weight,
                prefix + "self_attn.out_proj.bias": block.attn.out_proj.bias,
                prefix + "layer_norm1.weight": block.ln_1.weight,
                prefix + "layer_norm1.bias": block.ln_1.bias,
                prefix + "layer_norm2.weight": block.ln_2.weight,
                prefix + "layer_norm2.bias": block.ln_2.bias,
                prefix + "mlp.fc1.weight": block.mlp.c_fc.weight,
                prefix + "mlp.fc1.bias": block.mlp.c_fc.bias,
                prefix + "mlp.fc2.weight": block.mlp.c_proj.weight,
                prefix + "mlp.fc2.bias": block.mlp.c_proj.bias,
            }
        )
    missing, unexpected = model.load_state_dict(
        {k: v.detach().clone() for k, v in state.items()}, strict=False
    )
    unexpected_missing = [k for k in missing if "position_ids" not in k]
    if unexpected_missing or unexpected:
        raise RuntimeError(f"conversion left {unexpected_missing} unset and {unexpected} unused")
    return model
