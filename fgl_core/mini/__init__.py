"""`fgl-mini`: a miniature text-to-image generator that the project trains itself.

A Stable Diffusion pipeline of the same component classes (CLIP tokenizer with the real BPE,
`CLIPTextModel`, `UNet2DConditionModel`, `AutoencoderKL`, a scheduler), trained on digits the
project renders from matplotlib's fonts by `python -m fgl_mini.train` (the training program and
its corpus live outside the runtime, in `fgl_mini`). Its float16 weights ship in this package, in
`save_pretrained` layout, and load through the same `from_pretrained` path as a hub id.
"""

from __future__ import annotations

import sys
from pathlib import Path

FGL_MINI = "fgl-mini"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"  # where training installs them
WEIGHTS = Path("fgl_core", "mini", "weights")  # the same, relative to a directory on sys.path
WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def weights_dir() -> Path:
    """The shipped pipeline's directory.

    A Flower app runs from its FAB's copy of this package, and a FAB holds text files only, so
    the weights are looked for in this copy first and then in every directory on `sys.path`
    (the installed package, or the checkout of an editable install).
    """
    candidates = [PACKAGE_WEIGHTS, *(Path(entry) / WEIGHTS for entry in sys.path if entry)]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in WEIGHT_FILES):
            return candidate
    raise FileNotFoundError(
        f"{FGL_MINI}: its weights ({', '.join(WEIGHT_FILES)}) are in none of "
        f"{[str(c) for c in dict.fromkeys(candidates)]}; reinstall the package, or retrain "
        "them with `python -m fgl_mini.train --install`"
    )
