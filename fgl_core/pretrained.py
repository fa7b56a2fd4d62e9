"""Load hub models by reference: a hub id, a local `save_pretrained` directory, `fgl-mini` (the
trained miniature generator shipped in `fgl_core.mini`) or `offline-tiny` (the random stand-ins
that `fgl_core.offline_models` builds into the cache).

Every failure says which of three things went wrong: the reference is offline (not cached and
the hub cannot be reached), missing (no such directory or model), or malformed (a directory
that does not hold what `from_pretrained` needs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from fgl_core.mini import FGL_MINI, weights_dir
from fgl_core.offline_models import OFFLINE_TINY, OFFLINE_TINY_SDXL, offline_model_dir

T = TypeVar("T")


class ModelRefError(RuntimeError):
    """A model reference that cannot be loaded; the message says why and what to do."""


def resolve_model_ref(ref: str, kind: str, cache_dir: str | Path) -> str:
    """`offline-tiny` -> the built stand-in's directory (built once); `fgl-mini` -> the shipped
    pipeline's directory; anything else unchanged."""
    if ref == OFFLINE_TINY:
        return str(offline_model_dir(Path(cache_dir), kind))
    if ref == OFFLINE_TINY_SDXL:  # a generator whose silos encode with its own two encoders
        if kind == "captioner":
            raise ModelRefError(f"{OFFLINE_TINY_SDXL!r} is a generator; it cannot caption")
        return str(offline_model_dir(Path(cache_dir), "generator-sdxl"))
    if ref == FGL_MINI:
        if kind != "generator":
            raise ModelRefError(f"{FGL_MINI!r} is a generator; it cannot serve as the {kind}")
        try:
            return str(weights_dir())
        except FileNotFoundError as err:
            raise ModelRefError(str(err)) from None
    return ref


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or os.sep in ref.replace("/", "")


def load_component(cls: type[T], ref: str, subfolder: str | None, what: str, **kwargs: Any) -> T:
    """`cls.from_pretrained(ref, subfolder=...)` with errors that say offline/missing/malformed."""
    sub = {"subfolder": subfolder} if subfolder else {}
    path = Path(ref).expanduser()
    if path.is_dir():
        try:
            return cls.from_pretrained(str(path), **sub, **kwargs)  # type: ignore[attr-defined]
        except Exception as err:
            raise ModelRefError(
                f"{what} {ref!r} is a local directory, but {subfolder or 'the model'} could not be "
                f"loaded from it: malformed or incomplete ({type(err).__name__}: {err})"
            ) from None
    if _looks_like_path(ref):
        raise ModelRefError(f"{what} {ref!r}: no such directory (missing)")
    try:  # a hub id already in the local cache loads without the network
        return cls.from_pretrained(ref, **sub, local_files_only=True, **kwargs)  # type: ignore[attr-defined]
    except Exception:
        pass
    advice = (
        "pass a local directory in save_pretrained layout (downloaded on a connected machine), "
        f"or {FGL_MINI!r} for the trained miniature generator, or {OFFLINE_TINY!r} for the "
        "random stand-ins"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelRefError(
            f"{what} {ref!r} is a hub id that is not in the local cache, and HF_HUB_OFFLINE is "
            f"set (offline); {advice}"
        )
    try:
        return cls.from_pretrained(ref, **sub, **kwargs)  # type: ignore[attr-defined]
    except Exception as err:
        raise ModelRefError(
            f"{what} {ref!r} could not be loaded from the model hub: offline, or no such model "
            f"({type(err).__name__}: {err}); {advice}"
        ) from None


# The generator's family, by the pipeline class its own model_index.json names (never by its
# name): Stable Diffusion 1.x and 2.x, few-step SD-Turbo among them (guidance 0, steps 1-4), and
# SDXL (two text encoders: each prompt is a (77, 2048) embedding and a pooled (1280,) one).
FAMILIES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
}
NOT_YET = {  # families the issue tracker plans; a clear refusal until then
    "DiTPipeline": "DiT (class-conditional: the payload would be ImageNet class ids)",
}


def generator_family(ref: str) -> str | None:
    """The pipeline class `ref`'s model_index.json names, if it can be read here (None: let
    loading say why not); `ModelRefError` for a family this engine cannot run."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(ref, local_files_only=True)
    except Exception:
        return None
    name = str(config.get("_class_name", ""))
    if name in FAMILIES:
        return name
    known = ", ".join(sorted(FAMILIES))
    what = NOT_YET.get(name, f"a {name or 'pipeline of no _class_name'}")
    raise ModelRefError(
        f"generator {ref!r} is {what}: this version synthesizes with {known} (Stable Diffusion "
        "1.x/2.x, SD-Turbo with guidance 0 and 1-4 steps, SDXL)"
    )
