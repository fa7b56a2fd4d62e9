"""`fgl-mini`: a miniature text-to-image generator that the project trains itself.

A Stable Diffusion pipeline of the same component classes (CLIP tokenizer with the real BPE,
`CLIPTextModel`, `UNet2DConditionModel`, `AutoencoderKL`, a scheduler), trained on digits the
project renders from matplotlib's fonts by `python -m fgl_mini.train` (the training program and
its corpus live outside the runtime, in `fgl_mini`). Its float16 weights ship in this package, in
`save_pretrained` layout, and load through the same `from_pretrained` path as a hub id.

Its partner `fgl-mini-captioner`, a BLIP captioner (`BlipForConditionalGeneration`) trained on
the same corpus by `python -m fgl_mini.captioner`, ships beside it: it says which digit an image
shows and how it is drawn, for instance-level prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

FGL_MINI = "fgl-mini"
FGL_MINI_CAPTIONER = "fgl-mini-captioner"  # its partner for instance-level prompts (BLIP)
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"  # where training installs them
PACKAGE_CAPTIONER = Path(__file__).resolve().parent / "captioner"
WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
CAPTIONER_FILES = ("model.safetensors",)
# each shipped model: its folder in this package, the files that must be there, how to retrain
SHIPPED = {
    FGL_MINI: (PACKAGE_WEIGHTS, WEIGHT_FILES, "python -m fgl_mini.train --install"),
    FGL_MINI_CAPTIONER: (
        PACKAGE_CAPTIONER,
        CAPTIONER_FILES,
        "python -m fgl_mini.captioner --install",
    ),
}


def weights_dir(model: str = FGL_MINI) -> Path:
    """The directory of a shipped model (`fgl-mini`'s pipeline, or `fgl-mini-captioner`).

    A Flower app runs from its FAB's copy of this package, and a FAB holds text files only, so
    the weights are looked for in this copy first and then in every directory on `sys.path`
    (the installed package, or the checkout of an editable install).
    """
    folder, files, retrain = SHIPPED[model]
    relative = Path("fgl_core", "mini", folder.name)  # the same, below a directory on sys.path
    candidates = [folder, *(Path(entry) / relative for entry in sys.path if entry)]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in files):
            return candidate
    raise FileNotFoundError(
        f"{model}: its weights ({', '.join(files)}) are in none of "
        f"{[str(c) for c in dict.fromkeys(candidates)]}; reinstall the package, or retrain "
        f"them with `{retrain}`"
    )
