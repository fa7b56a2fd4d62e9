"""Load hub models by reference: a hub id, a local `save_pretrained` directory, `fgl-mini` (the
trained miniature generator shipped in `fgl_core.mini`) or `offline-tiny` (the random stand-ins
that `fgl_core.offline_models` builds into the cache).

Every failure says which of three things went wrong: the reference is offline (not cached and
the hub cannot be reached), missing (no such directory or model), or malformed (a directory
that does not hold what `from_pretrained` needs).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, TypeVar

from fgl_core.mini import FGL_MINI, FGL_MINI_CAPTIONER, weights_dir
from fgl_core.offline_models import (
    OFFLINE_TINY,
    OFFLINE_TINY_DIT,
    OFFLINE_TINY_SDXL,
    offline_model_dir,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
GENERATOR_STAND_INS = {OFFLINE_TINY_SDXL: "generator-sdxl", OFFLINE_TINY_DIT: "generator-dit"}


class ModelRefError(RuntimeError):
    """A model reference that cannot be loaded; the message says why and what to do."""


def resolve_model_ref(ref: str, kind: str, cache_dir: str | Path) -> str:
    """`offline-tiny` -> the built stand-in's directory (built once); `fgl-mini` and
    `fgl-mini-captioner` -> the shipped model's directory; anything else unchanged."""
    if ref == OFFLINE_TINY:
        return str(offline_model_dir(Path(cache_dir), kind))
    if ref in GENERATOR_STAND_INS:  # generators of the other families
        if kind == "captioner":
            raise ModelRefError(f"{ref!r} is a generator; it cannot caption")
        return str(offline_model_dir(Path(cache_dir), GENERATOR_STAND_INS[ref]))
    if ref in (FGL_MINI, FGL_MINI_CAPTIONER):
        if (kind == "captioner") != (ref == FGL_MINI_CAPTIONER):
            what = "the captioner" if ref == FGL_MINI_CAPTIONER else "a generator"
            raise ModelRefError(f"{ref!r} is {what}; it cannot serve as the {kind}")
        try:
            return str(weights_dir(ref))
        except FileNotFoundError as err:
            raise ModelRefError(str(err)) from None
    return ref


def model_digest(ref: str) -> str:
    """sha256 over the files of a loaded model reference (a directory, or a hub id's snapshot in
    the local cache): each file's path and bytes, in path order. Two directories holding the
    same files give the same digest; a changed weight or config file gives another.

    What a synthetic store was made with: its name alone (`fgl-mini`, a hub id, a path) does not
    say which weights, and a store made by other weights must not be reused."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(ref, local_files_only=True))
    start, digest, size = time.perf_counter(), hashlib.sha256(), 0
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        name = file.relative_to(path).as_posix()
        if any(part.startswith(".") for part in name.split("/")):
            continue  # a hub cache's or a clone's own bookkeeping
        with file.open("rb") as handle:
            digest.update(name.encode() + b"\0" + hashlib.file_digest(handle, "sha256").digest())
        size += file.stat().st_size
    seconds = time.perf_counter() - start
    log.info("%s: sha256 of %.1f MB of files in %.1f s", ref, size / 1e6, seconds)
    return digest.hexdigest()


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
# name): Stable Diffusion 1.x and 2.x, few-step SD-Turbo among them (guidance 0, steps 1-4),
# SDXL (two text encoders: each prompt is a (77, 2048) embedding and a pooled (1280,) one) and
# DiT (class-conditional: no text at all; each prompt is a class id of the generator's own
# label set, ImageNet's 1000 for the published DiT models).
FAMILIES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "DiTPipeline": "dit",
}
CLASS_CONDITIONAL = "DiTPipeline"


def generator_family(ref: str) -> str | None:
    """The pipeline class `ref`'s model_index.json names, if it can be read here (None: let
    loading say why not); `ModelRefError` for a family this engine cannot run."""
    config = _model_index(ref)
    if config is None:
        return None
    name = str(config.get("_class_name", ""))
    if name in FAMILIES:
        return name
    known = ", ".join(sorted(FAMILIES))
    raise ModelRefError(
        f"generator {ref!r} is a {name or 'pipeline of no _class_name'}: this version "
        f"synthesizes with {known} (Stable Diffusion 1.x/2.x, SD-Turbo with guidance 0 and 1-4 "
        "steps, SDXL, DiT)"
    )


def _model_index(ref: str) -> dict | None:
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(ref, local_files_only=True))
    except Exception:
        return None


def generator_labels(ref: str) -> dict[str, str]:
    """A class-conditional generator's own label set: model_index.json's `id2label` (the
    published DiT models keep ImageNet's there); {} if it has none."""
    return {str(k): str(v) for k, v in ((_model_index(ref) or {}).get("id2label") or {}).items()}


def generator_class_ids(ref: str, class_names: list[str]) -> list[int]:
    """Each class name's id in `ref`'s label set (`class_ids_for`)."""
    return class_ids_for(generator_labels(ref), class_names, f"generator {ref!r}")


def class_ids_for(id2label: dict[str, str], class_names: list[str], what: str) -> list[int]:
    """Each class name's id in a class-conditional generator's label set, whose entries list
    synonyms ("tench, Tinca tinca"), matched whole, ignoring case and with `_` as a space.
    `ModelRefError` names every class that matches no label or several (ImageNet has two
    "crane"s: name the class by another synonym)."""
    ids: dict[str, set[int]] = {}
    for key, synonyms in id2label.items():
        for synonym in str(synonyms).split(","):
            ids.setdefault(_label_key(synonym), set()).add(int(key))
    found, problems = [], []
    for name in class_names:
        matches = sorted(ids.get(_label_key(name), ()))
        if len(matches) == 1:
            found.append(matches[0])
            continue
        if matches:
            problems.append(f"{name!r} names classes {matches} (use another synonym)")
        else:
            near = difflib.get_close_matches(_label_key(name), list(ids), n=3)
            hint = f" (near: {near})" if near else ""
            problems.append(f"{name!r} is none of its labels{hint}")
    if problems or not id2label:
        raise ModelRefError(
            f"{what} draws the classes of its own label set ({len(id2label)} in its "
            "model_index.json's id2label); the task's class names must each name one: "
            + ("; ".join(problems) or "it has none")
        )
    return found


def _label_key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()
