"""Learned class embeddings: the conditioning that makes the generator denoise a silo's images of
one class best, learned on the silo (textual inversion of the whole 77 x D embedding).

A class template's text embedding says what the generator thinks "a photo of a neutrophil" looks
like; where it never saw the domain, that is far from the silo's images. Starting from that
embedding, the silo optimizes it against Stable Diffusion's denoising loss on its own images of
the class, through the frozen (or adapted) UNet, and would send the result in today's wire format
(77 x D float16, the same chunks, caps and noise option). What the server can check of it, and what
it leaks, are measured separately (issue "Where the generator has never seen the silos' domain");
this module only learns it; `fgl_client.learned` runs it on a silo for `prompt-mode = "learned"`.
"""

from __future__ import annotations

import torch

from fgl_core.adapters import denoising_loss, random_batch


def learn_class_embedding(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    start: torch.Tensor,
    scheduler,  # type: ignore[no-untyped-def]
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """One class's conditioning (77, D), learned from `start` (the class template's embedding) on
    `latents` (N, C, h, w), the silo's images of that class through the generator's VAE. The UNet
    is not changed (its weights take no gradient); one flat Adam loop of `steps` steps. Returns the
    learned embedding (float32, detached) and each step's loss."""
    if start.dim() != 2:
        raise ValueError(f"start must be one embedding (77, D), got shape {tuple(start.shape)}")
    if len(latents) == 0:
        raise ValueError("no images of this class to learn from")
    weights = [p for p in unet.parameters() if p.requires_grad]
    for param in weights:  # frozen for this loop, as they were afterwards
        param.requires_grad_(False)
    embedding = start.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    horizon = scheduler.config.num_train_timesteps
    losses = []
    try:
        for _ in range(steps):
            batch, noise, timesteps = random_batch(latents, batch_size, generator, horizon)
            conditioning = embedding.unsqueeze(0).expand(len(batch), -1, -1)
            loss = denoising_loss(unet, latents[batch], conditioning, noise, timesteps, scheduler)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for param in weights:
            param.requires_grad_(True)
    return embedding.detach(), losses
