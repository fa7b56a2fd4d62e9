"""What must adapt, and how adapters are averaged: two measurements behind
`generator-adaptation`'s design, on `fgl-mini` and BloodMNIST (a domain it never saw).

1. `decoder`: how much of BloodMNIST survives `fgl-mini`'s autoencoder. A small CNN (the run's
   default model and recipe) is trained on 200 training images a class and tested on the test
   split: as they are (28 px), brought to the generator's 16 px and back, and sent through the
   VAE (encode, decode) with its stock decoder, with the decoder's weights trained on those
   images' latents, and with a LoRA of the decoder's convolutions instead. No adapter of the
   denoiser can do better than its decoder renders.
2. `aggregation`: 5 silos (Dirichlet alpha 0.5 over the same images) each train an adapter of the
   denoiser from the same start for `--steps` steps; the adapters are combined four ways and each
   result's denoising loss is measured on held-out images of every silo (fixed noise and
   timesteps): FFA-LoRA (A shared and frozen, B averaged: exactly the mean update), standard LoRA
   with A and B each averaged, standard LoRA with the mean of the products (the exact mean
   update, full-rank), and that mean truncated back to the rank by SVD; with the bytes each
   uploads per round.

3. `prompts`: what the server's bound on learned class embeddings can tell apart: the relative
   L2 distance between the encodings of two classes' prompts (the paper's template), for
   BloodMNIST's class names and for the digits. A learned embedding may move up to
   `learned-max-distance` from its class's prompt; where another class's prompt lies closer than
   that, a silo can send it under this class's label and pass.

    python -m benchmarks.what_adapts      # -> outputs/benchmarks/what_adapts.json
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import DATASETS, write
from fgl_core.adapted_generator import (
    AdaptSettings,
    decoder_parameters,
    encode_images,
    encode_texts,
    load_pipeline,
    train_decoder,
)
from fgl_core.adapters import ADAPTER_NAME, AdapterSpec, attach, denoising_loss, train_adapter
from fgl_core.config import RunConfig
from fgl_core.datasets import ImageSet
from fgl_core.mini import weights_dir
from fgl_core.models import build_model
from fgl_core.prompt_templates import PAPER_TEMPLATE, class_prompt
from fgl_core.training import TrainSettings, evaluate_model, train_model

CPU = torch.device("cpu")


def per_class(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:count] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def accuracy(images: np.ndarray, labels: np.ndarray, test: ImageSet, epochs: int) -> float:
    """The run's default CNN and recipe trained on `images`, its test accuracy."""
    cfg = RunConfig()
    model = build_model(cfg.model, int(test.labels.max()) + 1, test.images.shape[1])
    settings = TrainSettings.from_config(cfg, epochs=epochs, seed=0, weight_decay=5e-4)
    train_model(model, ImageSet(images, labels), settings, CPU, desc="what-adapts")
    return float(evaluate_model(model, test, CPU, settings).accuracy)


def as_uint8(pixels: torch.Tensor, size: int) -> np.ndarray:
    """[-1, 1] (N, 3, r, r) -> (N, size, size, 3) uint8."""
    up = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
    return ((up.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def decoder_part(pipe, train: ImageSet, test: ImageSet, args) -> dict:  # type: ignore[no-untyped-def]
    size = train.images.shape[1]
    pixels, latents = encode_images(pipe, train.images)
    rows = {"real-28px": accuracy(train.images, train.labels, test, args.epochs)}
    rows["real-16px"] = accuracy(as_uint8(pixels, size), train.labels, test, args.epochs)

    def round_trip(vae) -> tuple[float, float]:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            decoded = vae.decode(latents).sample
        error = float(F.mse_loss(decoded, pixels))
        return accuracy(as_uint8(decoded, size), train.labels, test, args.epochs), error

    out: dict = {"accuracy": rows, "reconstruction-mse": {}, "trainable-parameters": {}}
    for name in ("stock-decoder", "decoder-weights", "decoder-lora"):
        vae = copy.deepcopy(pipe.vae)
        start = time.perf_counter()
        if name == "decoder-weights":
            train_decoder(vae, latents, pixels, args.decoder_steps, 64, 1e-3, seed=0)
            trainable = sum(p.numel() for p in decoder_parameters(vae).values())
        elif name == "decoder-lora":
            trainable = train_decoder_lora(vae, latents, pixels, args)
        else:
            trainable = 0
        rows[name], out["reconstruction-mse"][name] = round_trip(vae)
        out["trainable-parameters"][name] = trainable
        out.setdefault("train-seconds", {})[name] = time.perf_counter() - start
    return out


def train_decoder_lora(vae, latents, pixels, args) -> int:  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    convs = [n for n, m in vae.named_modules() if isinstance(m, torch.nn.Conv2d)
             and n.startswith(("decoder.", "post_quant_conv"))]  # fmt: skip
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                        target_modules=convs)  # fmt: skip
    vae.add_adapter(config, adapter_name=ADAPTER_NAME)
    vae.requires_grad_(False)
    params = [p for n, p in vae.named_parameters() if ".lora_B." in n]
    train_decoder(vae, latents, pixels, args.decoder_steps, 64, 1e-3, 0, params=params)
    return sum(p.numel() for p in params)


def lora_layers(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    params = dict(unet.named_parameters())
    return {n.split(".lora_A.")[0]: (p, params[n.replace(".lora_A.", ".lora_B.")])
            for n, p in params.items() if ".lora_A." in n}  # fmt: skip


def delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B A as a matrix (out, in * k * k) for linear and convolutional LoRA alike."""
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def aggregation_part(pipe, train: ImageSet, held: ImageSet, args) -> dict:  # type: ignore[no-untyped-def]
    from diffusers import DDPMScheduler

    from fgl_core.partition import split_by_proportions

    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    rng = np.random.default_rng(0)
    shares = rng.dirichlet([args.alpha] * args.silos, size=int(train.labels.max()) + 1)
    parts = split_by_proportions(train.labels, shares, seed=0)
    names = [str(n) for n in args.class_names]
    texts = [class_prompt(PAPER_TEMPLATE, n) for n in names]
    table = encode_texts(pipe, texts)
    _, latents = encode_images(pipe, train.images)
    scaled = latents * pipe.vae.config.scaling_factor
    _, held_latents = encode_images(pipe, held.images)
    held_scaled = held_latents * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(held_scaled.shape, generator=generator)
    steps_t = torch.randint(schedule.config.num_train_timesteps, (len(held_scaled),),
                            generator=generator)  # fmt: skip
    held_cond = table[torch.from_numpy(held.labels)]
    spec = AdapterSpec(rank=args.rank, alpha=float(args.rank), seed=0,
                       targets=AdaptSettings.defaults(adapter_seed=0).spec.targets)  # fmt: skip

    def held_loss(unet) -> float:  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return float(denoising_loss(unet, held_scaled, held_cond, noise, steps_t, schedule))

    base = copy.deepcopy(pipe.unet)
    attach(base, spec)
    out: dict = {"silo-images": [len(p) for p in parts], "stock": held_loss(base)}
    trained: dict[str, list] = {"ffa": [], "lora": []}
    for variant in trained:
        for index, part in enumerate(parts):
            unet = copy.deepcopy(base)
            if variant == "lora":  # standard LoRA: A trains too
                for name, param in unet.named_parameters():
                    if ".lora_A." in name:
                        param.requires_grad_(True)
            part_t = torch.from_numpy(part)
            train_adapter(unet, scaled[part_t], table[torch.from_numpy(train.labels[part])],
                          schedule, args.steps, 32, args.lr, seed=index)  # fmt: skip
            trained[variant].append({k: (a.detach().clone(), b.detach().clone())
                                     for k, (a, b) in lora_layers(unet).items()})  # fmt: skip
    weights = torch.tensor([len(p) for p in parts], dtype=torch.float32)
    weights /= weights.sum()

    def combined(layers_of: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                 full: dict[str, torch.Tensor] | None = None) -> float:  # fmt: skip
        unet = copy.deepcopy(base)
        layers = lora_layers(unet)
        with torch.no_grad():
            if layers_of is not None:
                for key, (a, b) in layers_of.items():
                    layers[key][0].copy_(a)
                    layers[key][1].copy_(b)
            else:  # the full-rank mean update, added to the base weights; LoRA itself at zero
                modules = dict(unet.named_modules())
                for key, update in (full or {}).items():
                    layer = modules[key].base_layer
                    layer.weight += update.reshape(layer.weight.shape) * (spec.alpha / spec.rank)
                    layers[key][1].zero_()
        return held_loss(unet)

    keys = list(trained["ffa"][0])

    def mean(pairs: list[dict], index: int) -> dict[str, torch.Tensor]:
        return {k: sum(w * p[k][index] for w, p in zip(weights, pairs, strict=True)) for k in keys}

    ffa_b, lora_a, lora_b = (
        mean(trained["ffa"], 1),
        mean(trained["lora"], 0),
        mean(trained["lora"], 1),
    )
    a_shared = {k: trained["ffa"][0][k][0] for k in keys}
    products = {k: sum(w * delta(*p[k]) for w, p in zip(weights, trained["lora"], strict=True))
                for k in keys}  # fmt: skip
    truncated = {}
    for key, product in products.items():
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
        root = s[: spec.rank].sqrt()
        a_shape = trained["lora"][0][key][0].shape
        b_shape = trained["lora"][0][key][1].shape
        truncated[key] = ((root[:, None] * vh[: spec.rank]).reshape(a_shape),
                          (u[:, : spec.rank] * root).reshape(b_shape))  # fmt: skip
    b_bytes = sum(trained["ffa"][0][k][1].numel() * 4 for k in keys)
    a_bytes = sum(trained["ffa"][0][k][0].numel() * 4 for k in keys)
    out["held-out-loss"] = {
        "ffa-lora (A frozen, B averaged = mean update)": combined(
            {k: (a_shared[k], ffa_b[k]) for k in keys}
        ),
        "lora, A and B averaged": combined({k: (lora_a[k], lora_b[k]) for k in keys}),
        "lora, mean of products (full rank)": combined(None, products),
        "lora, mean of products truncated to rank": combined(truncated),
    }
    out["each-silo-alone"] = {
        "ffa": [combined({k: (a_shared[k], p[k][1]) for k in keys}) for p in trained["ffa"]],
        "lora": [combined({k: p[k] for k in keys}) for p in trained["lora"]],
    }
    out["factor-mismatch"] = float(
        sum(torch.linalg.norm(products[k] - delta(lora_a[k], lora_b[k])) ** 2 for k in keys).sqrt()
        / sum(torch.linalg.norm(products[k]) ** 2 for k in keys).sqrt()
    )  # how far the product of the averaged factors is from the average of the products
    out["upload-bytes-per-silo"] = {"ffa-lora": b_bytes, "lora": a_bytes + b_bytes}
    return out


def prompts_part(pipe, class_names: list[str]) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    digits = [str(d) for d in range(10)]
    for name, names in (("bloodmnist", class_names), ("digits", digits)):
        encoded = encode_texts(pipe, [class_prompt(PAPER_TEMPLATE, n) for n in names])
        flat = encoded.reshape(len(names), -1).double()
        distance = torch.cdist(flat, flat) / flat.norm(dim=1)[:, None]
        others = distance[~torch.eye(len(names), dtype=torch.bool)]
        out[name] = {
            "inter-class-distance": {
                "min": float(others.min()),
                "median": float(others.median()),
                "max": float(others.max()),
            }
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["prompts", "decoder", "aggregation"])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--decoder-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=150, help="each silo's adapter steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--dataset", default=str(DATASETS / "bloodmnist_28.npz"))
    args = parser.parse_args()
    torch.manual_seed(0)
    with np.load(args.dataset, allow_pickle=False) as archive:
        x, y = archive["train_images"], archive["train_labels"].reshape(-1).astype(np.int64)
        test = ImageSet(archive["test_images"],
                        archive["test_labels"].reshape(-1).astype(np.int64))  # fmt: skip
        args.class_names = [str(n) for n in archive["classes"]]
    chosen = per_class(y, args.per_class, seed=0)
    train = ImageSet(x[chosen], y[chosen])
    rest = np.setdiff1d(np.arange(len(y)), chosen)
    held_idx = rest[per_class(y[rest], 16, seed=1)]
    held = ImageSet(x[held_idx], y[held_idx])
    pipe = load_pipeline(str(weights_dir()), CPU)
    record: dict = {"args": {k: v for k, v in vars(args).items()}}
    for part in args.parts:
        start = time.perf_counter()
        if part == "prompts":
            record["prompts"] = prompts_part(pipe, args.class_names)
        elif part == "decoder":
            record["decoder"] = decoder_part(pipe, train, test, args)
        else:
            record["aggregation"] = aggregation_part(pipe, train, held, args)
        record[part]["seconds"] = time.perf_counter() - start
        write("what_adapts", record)


if __name__ == "__main__":
    main()
