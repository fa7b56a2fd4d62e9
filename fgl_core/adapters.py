"""Federated LoRA adapters of the generator's denoiser: a silo's training, the adapter's files in
diffusers' format, and the server's aggregation.

Where the generator never saw the silos' domain (medical images; `fgl-mini`, which only draws
digits), each silo can adapt it to its own images before synthesis: low-rank adapters (LoRA, by
PEFT) on the UNet's attention projections, trained with the denoising loss on the silo's images,
conditioned on the prompts the silo would send. The server averages the silos' adapters and
synthesizes with the adapted generator.

Averaging LoRA's two factors separately is not averaging their product: the mean of B_i times the
mean of A_i is not the mean of B_i A_i. This module follows FFA-LoRA (Sun et al., ICLR 2024): A is
drawn once from a seed every silo shares and frozen, and only B trains (from zero). All silos'
updates then share one A, so the weighted mean of their B is exactly the weighted mean of their
updates (`tests/test_adapters.py` checks it, and that averaging both factors is not), and a silo
sends only B, half the bytes of a whole adapter.

The adapter loads where diffusers loads LoRA (`diffusers_state` and `save_lora_weights` /
`load_lora_weights`), so the same files work on `fgl-mini` and on SD 2.1. A silo may train under
DP-SGD (`train_adapter_private`, Opacus), its epsilon over all its rounds counted by Opacus' RDP
accountant. Not yet wired into a run: the `adapt` message, its rounds and checkpoints follow
(issue "Where the generator has never seen the silos' domain").
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# the attention projections of every transformer block: self- and cross-attention
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# beside them, the rest of the denoiser's blocks: the ResNet blocks' convolutions and the
# transformer blocks' projections and feed-forward layers
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2")  # fmt: skip
ADAPTER_NAME = "fgl"


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names whose and what."""


@dataclass(frozen=True)
class AdapterSpec:
    """What every silo's adapter is: its rank and scale, where it sits, and the seed of the
    frozen factor A that all silos share (the run's seed tree gives it)."""

    rank: int = 4
    alpha: float = 4.0
    seed: int = 0
    targets: tuple[str, ...] = LORA_TARGETS


def attach(unet: torch.nn.Module, spec: AdapterSpec) -> None:
    """Add the adapter to `unet` in place: A drawn from `spec.seed` (the same on every silo and on
    the server) and frozen, B at zero, so the UNet's output is unchanged until B trains; every
    other weight frozen."""
    from peft import LoraConfig

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights="gaussian",
        target_modules=list(spec.targets),
    )
    with torch.random.fork_rng(devices=[]):  # the shared A, without touching the caller's RNG
        torch.manual_seed(spec.seed)
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    unet.requires_grad_(False)
    for name, param in unet.named_parameters():
        if ".lora_B." in name:
            param.requires_grad_(True)


def trainable_state(unet: torch.nn.Module) -> dict[str, np.ndarray]:
    """The adapter's B factors (what a silo trains and sends), float32, by parameter name."""
    return {
        name: param.detach().to(torch.float32).cpu().numpy().copy()
        for name, param in unet.named_parameters()
        if ".lora_B." in name
    }


def load_trainable(unet: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Set the adapter's B factors from `state` (as `trainable_state` gives them)."""
    params = dict(unet.named_parameters())
    expected = {name for name in params if ".lora_B." in name}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterError(f"adapter factors do not match the UNet's: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")  # fmt: skip
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterError(f"{name}: shape {tuple(value.shape)}, the UNet's is "
                                   f"{tuple(param.shape)}")  # fmt: skip
            param.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def diffusers_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter (A and B) as `StableDiffusionPipeline.save_lora_weights(folder,
    unet_lora_layers=...)` takes it; a pipeline's `load_lora_weights(folder)` then loads it.

    PEFT's own key layout (`<module>.lora_A.weight`), not diffusers' older `lora.down` layout:
    `convert_state_dict_to_diffusers` renames only the attention projections' keys, so an
    adapter that also has convolutions comes out half in each layout, and `load_lora_weights`,
    which reads one layout per file, then silently drops the attention half (tests/
    test_adaptation.py loads a saved adapter back and compares the UNet's outputs)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def denoising_loss(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,  # type: ignore[no-untyped-def]
) -> torch.Tensor:
    """Stable Diffusion's training loss: the noise added to `latents` at `timesteps`, predicted
    from the noisy latents and the prompt's conditioning (epsilon prediction, mean squared)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    predicted = unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
    return F.mse_loss(predicted.float(), noise.float())


def random_batch(
    latents: torch.Tensor, batch_size: int, generator: torch.Generator, horizon: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training step's draw: which images (indices into `latents`), their diffusion noise, and
    their timesteps below `horizon`."""
    batch = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=generator)
    noise = torch.randn(latents[batch].shape, generator=generator)
    timesteps = torch.randint(horizon, (len(batch),), generator=generator)
    return batch, noise, timesteps


@dataclass(frozen=True)
class NullCondition:
    """Condition dropout: each training image is conditioned on `embedding` (the empty prompt's,
    (1, 77, D)) with probability `share` instead of its own prompt, as Stable Diffusion was
    trained for classifier-free guidance."""

    embedding: torch.Tensor
    share: float

    def apply(self, conditioning: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dropped = torch.rand(len(conditioning), generator=generator) < self.share
        if not dropped.any():
            return conditioning
        null = self.embedding.to(conditioning.dtype).expand(int(dropped.sum()), -1, -1)
        out = conditioning.clone()
        out[dropped] = null
        return out


def train_adapter(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    scheduler,  # type: ignore[no-untyped-def]
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    null: NullCondition | None = None,
    on_step: Callable[[], object] | None = None,
) -> list[float]:
    """Train the adapter's B factors on a silo's images: `latents` (N, C, h, w) are the images
    through the generator's VAE (scaled), `conditioning` (N, 77, D) each image's prompt
    embedding (some replaced by the empty prompt's with `null`); one flat loop of `steps` AdamW
    steps on random batches, `on_step` called after each (progress). The loss of each step."""
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise AdapterError("the UNet has no trainable adapter: attach() it first")
    if len(latents) != len(conditioning):
        raise AdapterError(f"{len(latents)} images, {len(conditioning)} conditionings")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    horizon = scheduler.config.num_train_timesteps
    losses = []
    unet.train()
    for _ in range(steps):
        batch, noise, timesteps = random_batch(latents, batch_size, generator, horizon)
        condition = conditioning[batch] if null is None else null.apply(conditioning[batch],
                                                                        generator)  # fmt: skip
        loss = denoising_loss(unet, latents[batch], condition, noise, timesteps,
                              scheduler)  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step()
    unet.eval()
    return losses


@dataclass(frozen=True)
class PrivateTraining:
    """DP-SGD for a silo's adapter, by Opacus: each image's gradient clipped to `max_grad_norm`,
    Gaussian noise of `noise_multiplier` times that norm added to the batch's sum, batches drawn
    by Poisson sampling (each image in each step with probability batch size / images), and the
    privacy spent counted by Opacus' RDP accountant at `delta`."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5


@dataclass(frozen=True)
class PrivateResult:
    """What a private adapter training gives: each step's loss, the accountant's history over all
    of this silo's private steps so far (carry it to the next round), and the silo's epsilon at
    the training's delta over that whole history."""

    losses: list[float]
    history: list[tuple[float, float, int]]
    epsilon: float


def train_adapter_private(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    conditioning: torch.Tensor,
    scheduler,  # type: ignore[no-untyped-def]
    steps: int,
    private: PrivateTraining,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    history: Sequence[tuple[float, float, int]] = (),
    null: NullCondition | None = None,
    on_step: Callable[[], object] | None = None,
) -> PrivateResult:
    """`train_adapter` under DP-SGD: the same loss and optimizer, with Opacus' per-image clipping
    and noise and Poisson-sampled batches. `history` is what the silo's earlier trainings spent
    (`PrivateResult.history`), so that the epsilon returned covers them all.

    `seed` drives only the diffusion noise and timesteps of the loss, which do not depend on the
    data; the privacy noise and the batches come from `train_private`."""
    if len(latents) != len(conditioning):
        raise AdapterError(f"{len(latents)} images, {len(conditioning)} conditionings")
    generator = torch.Generator().manual_seed(seed)
    horizon = scheduler.config.num_train_timesteps

    def loss(module: torch.nn.Module, batch_latents: torch.Tensor, batch_conditioning: torch.Tensor
             ) -> torch.Tensor:  # fmt: skip
        noise = torch.randn(batch_latents.shape, generator=generator)
        timesteps = torch.randint(horizon, (len(batch_latents),), generator=generator)
        if null is not None:  # per image, so each image's gradient stays its own
            batch_conditioning = null.apply(batch_conditioning, generator)
        return denoising_loss(module, batch_latents, batch_conditioning, noise, timesteps,
                              scheduler)  # fmt: skip

    return train_private(unet, (latents, conditioning), loss, steps, private, batch_size, lr,
                         history, on_step)  # fmt: skip


def train_private(
    module: torch.nn.Module,
    tensors: tuple[torch.Tensor, ...],
    loss: Callable[..., torch.Tensor],
    steps: int,
    private: PrivateTraining,
    batch_size: int,
    lr: float,
    history: Sequence[tuple[float, float, int]] = (),
    on_step: Callable[[], object] | None = None,
) -> PrivateResult:
    """`steps` DP-SGD steps (Opacus) of `module`'s trainable parameters on the examples `tensors`
    hold (one row per example), `loss(module, *batch)` on each Poisson-sampled batch, `on_step`
    called after each.

    The noise and the batches' sampling are drawn from the operating system's entropy, never from
    the run's seed tree (the server knows it: it could draw the same noise and take it back out,
    or know which images each step used). Opacus' `secure_mode` (a cryptographically secure
    generator) needs torchcsprng, which is not installed: a generator seeded from the OS is
    unpredictable to the server but not a CSPRNG; so private runs do not repeat bit for bit, as
    the silos' embedding noise does not."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise AdapterError("nothing to train: no parameter of the module requires a gradient")
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(step) for step in history]
    examples = len(tensors[0])
    loader = DataLoader(TensorDataset(*tensors), batch_size=min(batch_size, examples))
    was_training = module.training
    module.train()  # Opacus checks it
    wrapped, optimizer, batches = engine.make_private(
        module=module,
        optimizer=torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0),
        data_loader=loader,
        noise_multiplier=private.noise_multiplier,
        max_grad_norm=private.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(secrets.randbits(63)),
    )
    losses: list[float] = []
    try:
        with torch.random.fork_rng(devices=[]):  # Poisson sampling draws from the global RNG
            torch.manual_seed(secrets.randbits(63))
            while len(losses) < steps:
                for batch in batches:
                    value = loss(wrapped, *batch)
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    losses.append(float(value.detach()) if len(batch[0]) else float("nan"))
                    if on_step is not None:
                        on_step()
                    if len(losses) == steps:
                        break
    finally:
        wrapped.remove_hooks()
        for param in trainable:
            param.grad_sample = None
        module.train(was_training)
    return PrivateResult(
        losses=losses,
        history=[tuple(step) for step in engine.accountant.history],
        epsilon=float(engine.get_epsilon(private.delta)),
    )


def sample_rate(examples: int, batch_size: int) -> float:
    """The sampling rate Opacus' Poisson batches have for `examples` at `batch_size`: one over
    the number of batches of the plain loader (`DPDataLoader.from_data_loader`)."""
    return 1.0 / math.ceil(examples / min(batch_size, examples))


def epsilon_after(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """The epsilon at `delta` of `history`, Opacus' record of (noise multiplier, sample rate,
    steps), by dp-accounting (`fgl_core.accounting`): what a silo has spent, computed without
    training."""
    from fgl_core.accounting import dp_sgd, epsilon

    return epsilon([dp_sgd(history)], delta)


def average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The silos' B factors averaged, weighted by `weights` (their examples), in float32. With
    the shared frozen A this is exactly the weighted mean of the silos' updates. `names` say whose
    each state is, for the errors: different factors, shapes, or values that are not finite."""
    if not states or len(states) != len(weights) or len(states) != len(names):
        raise AdapterError(f"{len(states)} adapters, {len(weights)} weights, {len(names)} names")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise AdapterError(f"weights must be positive: {list(weights)}")
    reference = states[0]
    for state, name in zip(states, names, strict=True):
        if set(state) != set(reference):
            raise AdapterError(f"{name}'s adapter has other factors than {names[0]}'s")
        for key, value in state.items():
            if value.shape != reference[key].shape:
                raise AdapterError(f"{name}'s {key} has shape {value.shape}, "
                                   f"{names[0]}'s {reference[key].shape}")  # fmt: skip
            if not np.all(np.isfinite(value)):
                raise AdapterError(f"{name}'s {key} holds values that are not finite")
    shares = [np.float32(w / float(sum(weights))) for w in weights]
    merged = {}
    for key in reference:
        total = np.zeros(reference[key].shape, dtype=np.float32)
        for state, share in zip(states, shares, strict=True):
            total += np.asarray(state[key], dtype=np.float32) * share
        merged[key] = total
    return merged
