"""LoRA adapters of the generator's denoiser (fgl_core/adapters.py) and learned class embeddings
(fgl_core/learned_prompts.py), on `fgl-mini` and BloodMNIST.

`fgl-mini` only ever drew digits; a silo's blood-cell images are a domain it never saw. The tests
attach the adapter, train it on a silo's images, check that only B moved and that the denoising
loss on those images fell, that the FFA-LoRA average (shared frozen A, B averaged) is exactly the
mean of the silos' updates while averaging both factors is not, that the adapter loads back
through diffusers' own `load_lora_weights`, and that a bad adapter is refused by name; and that a
class embedding learned from the template's denoises that class's images better than the template
does, leaving the UNet as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgl_core.adapters import (
    AdapterError,
    AdapterSpec,
    attach,
    average,
    denoising_loss,
    diffusers_state,
    load_trainable,
    train_adapter,
    trainable_state,
)

IMAGES = 32


@pytest.fixture(scope="module")
def mini():
    """fgl-mini's pipeline (float32, CPU), loaded once; each test attaches to a copy of its UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from fgl_core.mini import weights_dir

    pipe = StableDiffusionPipeline.from_pretrained(
        weights_dir(), safety_checker=None, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe, noise_schedule


@pytest.fixture(scope="module")
def blood_batch(mini, blood_npz):
    """A silo's BloodMNIST images through fgl-mini's VAE, each with its class prompt's embedding."""
    pipe, _ = mini
    data = np.load(blood_npz, allow_pickle=False)
    images = torch.from_numpy(data["train_images"][:IMAGES]).float() / 127.5 - 1.0
    images = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 else images
    size = pipe.vae.config.sample_size
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
    labels = data["train_labels"][:IMAGES].reshape(-1)
    names = [str(n) for n in data["classes"]]
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([f"a photo of a {names[int(y)]}" for y in labels],
                             padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids  # fmt: skip
        conditioning = pipe.text_encoder(ids)[0]
    return latents, conditioning, torch.from_numpy(labels.astype(np.int64))


def fresh_unet(mini, spec: AdapterSpec):
    import copy

    unet = copy.deepcopy(mini[0].unet)
    attach(unet, spec)
    return unet


def held_out_loss(unet, latents, conditioning, schedule, seed: int = 123) -> float:
    """The denoising loss at fixed noise and timesteps: comparable before and after training."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(schedule.config.num_train_timesteps, (len(latents),),
                              generator=generator)  # fmt: skip
    with torch.no_grad():
        return float(denoising_loss(unet, latents, conditioning, noise, timesteps, schedule))


def lora_pairs(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's (A, B), by the layer's name."""
    params = dict(unet.named_parameters())
    return {
        name.split(".lora_A.")[0]: (param.detach().clone(),
                                    params[name.replace(".lora_A.", ".lora_B.")].detach().clone())
        for name, param in params.items()
        if ".lora_A." in name
    }  # fmt: skip


def test_an_attached_adapter_changes_nothing_until_it_trains_and_shares_a_from_the_seed(mini):
    pipe, _ = mini
    spec = AdapterSpec(rank=4, seed=7)
    one, two, other = fresh_unet(mini, spec), fresh_unet(mini, spec), fresh_unet(
        mini, AdapterSpec(rank=4, seed=8)
    )
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(pipe.unet(sample, t, encoder_hidden_states=cond).sample,
                           one(sample, t, encoder_hidden_states=cond).sample)  # fmt: skip
    a1, a2, a3 = lora_pairs(one), lora_pairs(two), lora_pairs(other)
    assert len(a1) == 32  # every attention projection of fgl-mini's UNet
    assert all(torch.equal(a1[k][0], a2[k][0]) for k in a1)  # the same A on every silo
    assert not any(torch.equal(a1[k][0], a3[k][0]) for k in a1)  # another seed, another A
    trainable = {n for n, p in one.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)


def test_training_on_a_silos_blood_cells_moves_only_b_and_lowers_their_denoising_loss(
    mini, blood_batch
):
    _, schedule = mini
    latents, conditioning, _ = blood_batch
    unet = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
    before_pairs = lora_pairs(unet)
    before = held_out_loss(unet, latents, conditioning, schedule)
    counted: list[int] = []  # what a silo's progress lines count
    losses = train_adapter(unet, latents, conditioning, schedule, steps=40, lr=3e-3, seed=1,
                           on_step=lambda: counted.append(1))  # fmt: skip
    after = held_out_loss(unet, latents, conditioning, schedule)
    after_pairs = lora_pairs(unet)
    assert len(losses) == 40 and all(np.isfinite(losses)) and len(counted) == 40
    assert all(torch.equal(before_pairs[k][0], after_pairs[k][0]) for k in before_pairs)  # A
    assert any(after_pairs[k][1].abs().sum() > 0 for k in after_pairs)  # B moved
    print(f"denoising loss on the silo's images: {before:.4f} -> {after:.4f}")
    assert after < before * 0.97, (before, after)


def test_condition_dropout_puts_the_empty_prompt_on_its_share_of_each_batch(mini, blood_batch):
    """Classifier-free guidance steers from the prediction under the empty prompt: with
    `adaptation-null-share` that share of the training images is conditioned on it, the rest on
    their own prompts; whether it helps guidance is measured by `benchmarks.adaptation`."""
    from fgl_core.adapted_generator import encode_texts
    from fgl_core.adapters import NullCondition

    pipe, schedule = mini
    latents, conditioning, _ = blood_batch
    with torch.no_grad():
        empty = encode_texts(pipe, [""])
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(20):
        dropped = NullCondition(empty, share=0.25).apply(conditioning, generator)
        is_null = (dropped == empty).flatten(1).all(1)
        assert torch.equal(dropped[~is_null], conditioning[~is_null])
        counts.append(int(is_null.sum()))
    assert 0.2 < np.mean(counts) / len(conditioning) < 0.3
    assert NullCondition(empty, share=0.0).apply(conditioning, generator) is conditioning
    unet = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
    plain = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
    train_adapter(unet, latents, conditioning, schedule, steps=2, seed=1,
                  null=NullCondition(empty, share=0.5))  # fmt: skip
    train_adapter(plain, latents, conditioning, schedule, steps=2, seed=1)
    b, plain_b = trainable_state(unet), trainable_state(plain)
    assert any(not np.allclose(b[k], plain_b[k]) for k in b)  # it trained on other conditions


def test_the_average_of_b_with_a_shared_a_is_exactly_the_mean_update_unlike_averaging_both(mini):
    spec = AdapterSpec(rank=4, seed=3)
    rng = np.random.default_rng(0)
    silos = []
    for _ in range(3):
        unet = fresh_unet(mini, spec)
        state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in
                 trainable_state(unet).items()}  # fmt: skip
        silos.append(state)
    weights = [10.0, 30.0, 60.0]
    merged = fresh_unet(mini, spec)
    load_trainable(merged, average(silos, weights, ["silo 0", "silo 1", "silo 2"]))
    pairs = lora_pairs(merged)
    share = np.array(weights) / sum(weights)
    for layer, (a, b) in pairs.items():
        key = next(k for k in silos[0] if k.startswith(layer + ".lora_B."))
        updates = [torch.from_numpy(s[key]) @ a for s in silos]
        mean_update = sum(w * u for w, u in zip(share, updates, strict=True))
        torch.testing.assert_close(b @ a, mean_update.float(), rtol=1e-5, atol=1e-6)
    # averaging both factors of independently drawn As is not the mean update
    a_s = [torch.randn(4, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    b_s = [torch.randn(32, 4, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    naive = (sum(b_s) / 3) @ (sum(a_s) / 3)
    exact = sum(b @ a for a, b in zip(a_s, b_s, strict=True)) / 3
    assert (naive - exact).abs().max() > 0.1


def test_the_adapter_loads_back_through_diffusers_load_lora_weights(mini, blood_batch, tmp_path):
    from diffusers import StableDiffusionPipeline

    from fgl_core.mini import weights_dir

    pipe, schedule = mini
    latents, conditioning, _ = blood_batch
    unet = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
    train_adapter(unet, latents, conditioning, schedule, steps=5, lr=3e-3, seed=1)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=diffusers_state(unet))
    loaded = StableDiffusionPipeline.from_pretrained(
        weights_dir(), safety_checker=None, dtype=torch.float32
    )
    loaded.load_lora_weights(tmp_path)
    t = torch.tensor([250] * 4)
    with torch.no_grad():
        ours = unet(latents[:4], t, encoder_hidden_states=conditioning[:4]).sample
        theirs = loaded.unet(latents[:4], t, encoder_hidden_states=conditioning[:4]).sample
        stock = pipe.unet(latents[:4], t, encoder_hidden_states=conditioning[:4]).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - stock).abs().max() > 1e-4  # the adapter does something


def test_a_bad_adapter_is_refused_by_whose_it_is(mini):
    unet = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
    good = trainable_state(unet)
    key = next(iter(good))
    bad_shape = {**good, key: np.zeros((1, 1), np.float32)}
    not_finite = {**good, key: np.full(good[key].shape, np.nan, np.float32)}
    missing = {k: v for k, v in good.items() if k != key}
    names = ["node 1", "node 2"]
    with pytest.raises(AdapterError, match=r"node 2's .* has shape"):
        average([good, bad_shape], [1, 1], names)
    with pytest.raises(AdapterError, match=r"node 2's .* not finite"):
        average([good, not_finite], [1, 1], names)
    with pytest.raises(AdapterError, match="node 2's adapter has other factors"):
        average([good, missing], [1, 1], names)
    with pytest.raises(AdapterError, match="weights must be positive"):
        average([good, good], [1, 0], names)
    with pytest.raises(AdapterError, match="missing"):
        load_trainable(unet, missing)


def test_a_learned_class_embedding_denoises_its_class_better_than_the_template_unet_untouched(
    mini, blood_batch
):
    from fgl_core.learned_prompts import learn_class_embedding

    _, schedule = mini
    latents, conditioning, labels = blood_batch
    cls = int(torch.mode(labels).values)
    mine = labels == cls
    template = conditioning[mine][0]
    unet = fresh_unet(mini, AdapterSpec(rank=4, seed=0))  # an adapter's B stays trainable
    before_weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    learned, losses = learn_class_embedding(unet, latents[mine], template, schedule, steps=40,
                                            lr=2e-2, seed=3)  # fmt: skip
    assert learned.shape == template.shape and len(losses) == 40
    assert all(torch.equal(before_weights[n], p) for n, p in unet.named_parameters())
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        n for n in before_weights if ".lora_B." in n
    }
    count = int(mine.sum())
    with_template = held_out_loss(unet, latents[mine], template.expand(count, -1, -1), schedule)
    with_learned = held_out_loss(unet, latents[mine], learned.expand(count, -1, -1), schedule)
    moved = float((learned - template).norm() / template.norm())
    print(f"class {cls} ({count} images): denoising loss {with_template:.4f} with the template, "
          f"{with_learned:.4f} learned; moved {moved:.3f} of the template's norm")  # fmt: skip
    assert with_learned < with_template, (with_template, with_learned)
    with pytest.raises(ValueError, match="one embedding"):
        learn_class_embedding(unet, latents[mine], conditioning[:2], schedule, steps=1)


def test_private_training_clips_each_images_gradient_adds_noise_and_accounts_every_round(
    mini, blood_batch
):
    from opacus.accountants import RDPAccountant

    from fgl_core.adapters import PrivateTraining, train_adapter_private

    _, schedule = mini
    latents, conditioning, _ = blood_batch
    clip, batch = 1e-4, 8
    seen: list[float] = []

    def gradient_norm(optimizer, args, kwargs):  # the step's gradient, after Opacus
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(gradient_norm)
    try:
        plain = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
        train_adapter(plain, latents, conditioning, schedule, steps=3, batch_size=batch, seed=1)
        unclipped, seen[:] = list(seen), []
        quiet = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
        first = train_adapter_private(quiet, latents, conditioning, schedule, steps=3,
                                      private=PrivateTraining(0.0, clip), batch_size=batch,
                                      seed=1)  # fmt: skip
        clipped = list(seen)
    finally:
        hook.remove()
    # each image's gradient clipped to `clip`; Opacus divides the sum by the expected batch
    assert max(clipped) <= clip * len(latents) / batch * (1 + 1e-4), clipped
    assert min(unclipped) > 10 * max(clipped), (unclipped, clipped)
    assert len(first.losses) == 3
    noisy = fresh_unet(mini, AdapterSpec(rank=4, seed=0))
    counted: list[int] = []
    one = train_adapter_private(noisy, latents, conditioning, schedule, steps=3,
                                private=PrivateTraining(1.0, clip), batch_size=batch,
                                seed=1, on_step=lambda: counted.append(1))  # fmt: skip
    assert len(counted) == 3
    quiet_b, noisy_b = trainable_state(quiet), trainable_state(noisy)
    assert any(not np.allclose(quiet_b[k], noisy_b[k]) for k in quiet_b)  # the noise is there
    # a second round adds to the first's spending; the epsilon is the accountant's for all of it
    two = train_adapter_private(noisy, latents, conditioning, schedule, steps=3,
                                private=PrivateTraining(1.0, clip), batch_size=batch, seed=2,
                                history=one.history)  # fmt: skip
    assert sum(s for *_, s in two.history) == 6 and two.epsilon > one.epsilon > 0
    accountant = RDPAccountant()
    accountant.history = [(1.0, batch / len(latents), 6)]
    assert two.epsilon == pytest.approx(accountant.get_epsilon(1e-5))
    print(f"epsilon at delta 1e-5, noise 1.0, sampling {batch / len(latents)}: "
          f"{one.epsilon:.2f} after 3 steps, {two.epsilon:.2f} after 6")  # fmt: skip
    assert all(getattr(p, "grad_sample", None) is None for p in noisy.parameters())
