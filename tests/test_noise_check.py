"""The noise-aware class-prompt check, as properties over noise levels and clip norms: an honest
silo's clipped, noised class prompts pass at every level; zeros, prompts sent without their
noise or with half of it, and (where the noise is small enough to tell) another class's prompt
or a scaled-down one with the right noise are refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgl_core.dp import clip_rows, noise_std, privatize
from fgl_server.validation import PayloadLimits, PayloadRejected, check_class_prompts

CLASSES, ROWS, WIDTH = 6, 77, 64
# the prompts' own streams (list seeds): no integer seed the tests draw for the noise can
# replay them, which would make the noise a copy of a prompt (seed 1 did)
BASE = np.random.default_rng([7, 1]).standard_normal((ROWS, WIDTH))
# a template's classes: one shared part, a smaller part of each class's own (cosine about 0.86)
PROMPTS = BASE + 0.4 * np.random.default_rng([7, 2]).standard_normal((CLASSES, ROWS, WIDTH))
NORM = float(np.linalg.norm(PROMPTS[0]))
LABELS = np.arange(CLASSES)

multipliers = st.floats(1e-3, 4.0).map(float)  # the noise multiplier a run may declare
small_multipliers = st.floats(1e-3, 3e-3)  # where another prompt is still visible
clip_fractions = st.floats(0.3, 2.0)  # the clip norm against the prompts' norm (>1: no clip)
seeds = st.integers(0, 2**32 - 1)


def limits(clip: float, multiplier: float) -> PayloadLimits:
    return PayloadLimits(
        width=WIDTH,
        num_classes=CLASSES,
        probe=PROMPTS[0].astype(np.float16),
        class_prompts=PROMPTS[None].astype(np.float16),  # as the server encodes them
        class_names=tuple(f"class {c}" for c in range(CLASSES)),
        embedding_clip=clip,
        noise_std=noise_std(clip, multiplier),
    )


def sent(embeds: np.ndarray) -> np.ndarray:
    return embeds.astype(np.float16)  # the wire's dtype


def refused(embeds: np.ndarray, clip: float, multiplier: float) -> str:
    with pytest.raises(PayloadRejected) as error:
        check_class_prompts("node 7", sent(embeds), LABELS, limits(clip, multiplier))
    return str(error.value)


@settings(max_examples=40, deadline=None)
@given(multipliers, clip_fractions, seeds)
def test_honest_noised_class_prompts_pass_at_every_noise_level(multiplier, fraction, seed):
    clip = fraction * NORM
    honest = privatize(PROMPTS, clip, multiplier, np.random.default_rng(seed))
    check_class_prompts("node 1", sent(honest), LABELS, limits(clip, multiplier))


@settings(max_examples=25, deadline=None)
@given(multipliers, clip_fractions, seeds)
def test_zeros_noiseless_prompts_and_half_the_noise_are_refused_at_every_level(
    multiplier, fraction, seed
):
    clip, rng = fraction * NORM, np.random.default_rng(seed)
    # zeros and another class's prompt: too little noise, or (small noise) too far off
    assert "node 7: its embedding for class 0" in refused(np.zeros_like(PROMPTS), clip, multiplier)
    foreign = clip_rows(np.roll(PROMPTS, 1, axis=0), clip)  # each class sent another's
    assert "node 7: its embedding for class 0" in refused(foreign, clip, multiplier)
    assert "too little noise" in refused(clip_rows(PROMPTS, clip), clip, multiplier)
    half = clip_rows(PROMPTS, clip) + rng.normal(0, noise_std(clip, multiplier) / 2, PROMPTS.shape)
    assert "too little noise" in refused(half, clip, multiplier)


@settings(max_examples=25, deadline=None)
@given(small_multipliers, clip_fractions, seeds)
def test_another_class_or_a_scaled_down_prompt_with_the_right_noise_is_refused_where_visible(
    multiplier, fraction, seed
):
    clip, rng = fraction * NORM, np.random.default_rng(seed)
    foreign = privatize(np.roll(PROMPTS, 1, axis=0), clip, multiplier, rng)
    assert "node 7: its embedding for class" in refused(foreign, clip, multiplier)
    scaled = clip_rows(PROMPTS, clip) / 2 + rng.normal(
        0, noise_std(clip, multiplier), PROMPTS.shape
    )
    message = refused(scaled, clip, multiplier)
    assert "along the class prompt" in message or "residual" in message


def test_what_strong_noise_hides_is_not_claimed():
    """At multiplier 4 the noise (sigma = 8 x the clip) dwarfs any prompt: another class's
    prompt with the right noise passes, as it must for the noise to protect anything."""
    clip, multiplier = 0.5 * NORM, 4.0
    foreign = privatize(np.roll(PROMPTS, 1, axis=0), clip, multiplier, np.random.default_rng(0))
    check_class_prompts("node 1", sent(foreign), LABELS, limits(clip, multiplier))
