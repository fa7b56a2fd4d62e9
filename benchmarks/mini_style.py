"""Does a style word change what `fgl-mini` draws? For each style word, images of every digit
drawn from a prompt with the word beside the same with "plain", each measured for stroke width,
height, ink and slant (`fgl_mini.style`), in two caption forms: the one a silo sends with
`fgl-mini-captioner` at instance level ("7, a bold seven, real world images, high resolution.")
and the one in `fgl-mini`'s corpus ("7, bold, real world images, high resolution.").
Prompts are encoded by the silo's encoder, sent as float16 and drawn by the server's engine at
16 px, as FGL does. Image i of every word is drawn from the same noise as image i of "plain", so
each effect is a paired difference (`fgl_mini.style.word_effects(paired=True)`). Beside them, the
same effects on the glyph corpus itself (`corpus-glyphs`): what the generator was trained to show.

    python -m benchmarks.mini_style       # -> outputs/benchmarks/mini_style.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import OUT, write
from fgl_client.text_encoding import TransformersTextEncoder
from fgl_core.mini import FGL_MINI
from fgl_core.prompt_templates import INSTANCE_TEMPLATE
from fgl_mini.corpus import DIGIT_WORDS
from fgl_mini.style import EXPECTED, corpus_effects, shape_measures, word_effects
from fgl_server.synthesis import ShardInputs, SynthesisEngine, SynthesisSettings

CPU = torch.device("cpu")
WORDS = ("plain", *EXPECTED)
FORMS = {
    "silo": lambda digit, word: f"a {word} {DIGIT_WORDS[digit]}",  # fgl-mini-captioner's
    "corpus": lambda digit, word: word,  # fgl-mini's instance captions
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit and word")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--generator", default=FGL_MINI, help="a pipeline directory to try")
    args = parser.parse_args()
    torch.set_num_threads(2)
    encoder = TransformersTextEncoder(args.generator, OUT / "cache", CPU)
    settings = SynthesisSettings.defaults(
        generator=args.generator, steps=args.steps, guidance=args.guidance, train_resolution=16
    )
    engine = SynthesisEngine.load(settings, OUT / "cache", CPU)
    start, forms = time.perf_counter(), {}
    for form, caption in FORMS.items():
        by_word = {}
        for word in WORDS:
            prompts = [
                INSTANCE_TEMPLATE.format(label=str(d), caption=caption(d, word)) for d in range(10)
            ]
            embeds = encoder.encode(prompts).numpy().astype(np.float16)  # the wire's dtype
            rows = np.repeat(embeds, args.per_digit, axis=0)
            seeds = list(range(len(rows)))  # the same noise for every word: paired images
            by_word[word] = shape_measures(engine.generate(ShardInputs.of(rows, seeds)))
        means = {
            w: {k: round(float(np.nanmean(v)), 3) for k, v in m.items()} for w, m in by_word.items()
        }
        effects = word_effects(by_word, paired=True)
        forms[form] = {"example": prompts[7], "means": means, "effects": effects}
        moved = {w: e["moves-as-said"] for w, e in forms[form]["effects"].items()}
        print(f"{form}: {moved}", flush=True)
    write(
        "mini_style",
        {
            "generator": args.generator,
            "steps": args.steps,
            "guidance": args.guidance,
            "images-per-word": 10 * args.per_digit,
            "seconds": round(time.perf_counter() - start, 1),
            "forms": forms,
            "corpus-glyphs": corpus_effects(),
        },
    )


if __name__ == "__main__":
    main()
