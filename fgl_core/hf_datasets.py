"""Hugging Face datasets as `dataset = "hf:<id or path>"`.

`<id or path>` is what `datasets.load_dataset` takes: a hub id (`hf:frgfm/imagenette`, on a
connected machine; `hf:frgfm/imagenette:320px` picks a configuration) or a local directory of
parquet files or an `imagefolder` tree (`train/<class>/...`); a directory written by
`save_to_disk` is read with `load_from_disk`. The splits and columns default to `train` / `test`
(else `validation`) and `image` / `label`; `hf-*` keys name others. A `ClassLabel` column brings
its class names; string labels become classes in sorted order; `hf-domain-column` gives each
image a domain (for `partition = "domain"`, Flower Datasets' `NaturalIdPartitioner`).

Images are decoded once into the same in-memory uint8 arrays as every other source; `datasets`
(with `pyarrow`) is imported only when such a dataset is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fgl_core.config import DataSettings
from fgl_core.image_ops import square_rgb

log = logging.getLogger(__name__)

PREFIX = "hf:"
DEFAULT_SIZE = 64  # images of different sizes are brought to this, as ImageFolder's are


class HFDatasetError(ValueError):
    """A Hugging Face dataset that cannot be read as this project needs it."""


def is_hf(source: str) -> bool:
    return source.startswith(PREFIX)


def local_path(source: str) -> Path | None:
    """The local directory an `hf:` source names, or None for a hub id."""
    path = Path(source.removeprefix(PREFIX)).expanduser()
    return path if path.exists() else None


def absolute_source(source: str, always: bool = False) -> str:
    """`source` with its local path made absolute, for processes that start elsewhere: a file or
    folder, or the directory after `hf:`; a hub id or a name is left as it is. `always`: make a
    plain path absolute even when it does not exist (so an error names it in full)."""
    prefix = PREFIX if is_hf(source) else ""
    path = Path(source.removeprefix(prefix)).expanduser()
    if path.exists() or (always and not prefix):
        return prefix + str(path.resolve())
    return source


def load_hf_splits(
    cfg: DataSettings, source: str
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], list[str], list[str]]:
    """{split: (images (N, H, W, 3) uint8, labels, domains or None)}, class names, domain names.

    The returned splits are `train`, `test` and, when the dataset has one besides its test
    split, `val`.
    """
    dataset = _open(source)
    splits = list(dataset)
    train_name = cfg.hf_train_split
    test_name = cfg.hf_test_split or next(
        (s for s in ("test", "validation", "valid", "val") if s in splits), "test"
    )
    val_name = next((s for s in ("validation", "valid", "val") if s in splits), "")
    for name, key in ((train_name, "hf-train-split"), (test_name, "hf-test-split")):
        if name not in splits:
            raise HFDatasetError(
                f"dataset {source!r} has no split {name!r} (it has {splits}); set {key}"
            )
    chosen = {"train": train_name, "test": test_name}
    if val_name and val_name != test_name:
        chosen["val"] = val_name
    features = dataset[train_name].features
    for column, key in (
        (cfg.hf_image_column, "hf-image-column"),
        (cfg.hf_label_column, "hf-label-column"),
        (cfg.hf_domain_column, "hf-domain-column"),
    ):
        if column and column not in features:
            raise HFDatasetError(
                f"dataset {source!r}: split {train_name!r} has no column {column!r} "
                f"(it has {sorted(features)}); set {key}"
            )
    label_feature = features[cfg.hf_label_column]
    class_names = list(getattr(label_feature, "names", None) or [])
    raw = {split: dataset[name] for split, name in chosen.items()}
    labels, string_names = _labels(raw, cfg.hf_label_column, source)
    class_names = class_names or string_names
    domains, domain_names = _domains(raw, cfg.hf_domain_column)
    train_where = f"{source}:{train_name}"
    size = (
        cfg.image_size
        or _common_square_size(raw["train"], cfg.hf_image_column, train_where)
        or DEFAULT_SIZE
    )
    out = {}
    for split, part in raw.items():
        where = f"{source}:{chosen[split]}"
        log.info("%s: decoding %d images at %d px", where, len(part), size)
        images, kept = _images(part, cfg.hf_image_column, size, cfg.resize, where)
        if len(part) and not kept.any():
            raise HFDatasetError(f"{where}: none of its {len(part)} images can be decoded")
        split_labels, split_domains = labels[split], domains.get(split)
        if not kept.all():  # as unreadable files in an ImageFolder tree are skipped
            skipped = np.flatnonzero(~kept)
            log.warning(
                "%s: skipped %d images that cannot be decoded (column %r, rows %s%s)",
                where,
                len(skipped),
                cfg.hf_image_column,
                skipped[:5].tolist(),
                ", ..." if len(skipped) > 5 else "",
            )
            images, split_labels = images[kept], split_labels[kept]
            split_domains = None if split_domains is None else split_domains[kept]
        out[split] = (images, split_labels, split_domains)
    return out, class_names, domain_names


def _open(source: str) -> Any:
    """A DatasetDict for `source`; errors name the source and what to do."""
    try:
        import datasets
    except ImportError as err:  # a dependency of flwr-datasets, so present unless removed
        raise HFDatasetError(f"dataset {source!r} needs the `datasets` package: {err}") from None
    target = source.removeprefix(PREFIX)
    if not target:
        raise HFDatasetError("dataset 'hf:' names nothing; write hf:<hub id> or hf:<directory>")
    path = local_path(source)
    try:
        saved = ("dataset_dict.json", "state.json")  # save_to_disk: a DatasetDict, a Dataset
        if path is not None and any((path / name).is_file() for name in saved):
            loaded = datasets.load_from_disk(str(path))
        elif path is not None:
            loaded = datasets.load_dataset(str(path))
        else:
            repo, _, config = target.partition(":")
            loaded = datasets.load_dataset(repo, config or None)
    except Exception as err:  # datasets raises many kinds: missing files, no network, bad data
        where = "the directory" if path is not None else "the Hugging Face hub id"
        hint = "" if path is not None else " (a hub id needs network access, or a local cache)"
        raise HFDatasetError(
            f"dataset {source!r}: {where} could not be loaded{hint}: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise HFDatasetError(
            f"dataset {source!r} is a single split; save it as a DatasetDict with train and "
            "test splits"
        )
    return loaded


def _labels(
    raw: dict[str, Any], column: str, source: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    values = {split: part[column] for split, part in raw.items()}
    first = next((v[0] for v in values.values() if len(v)), 0)
    if isinstance(first, str):  # string labels: classes in sorted order
        names = sorted({str(x) for v in values.values() for x in v})
        index = {name: i for i, name in enumerate(names)}
        return {s: np.asarray([index[str(x)] for x in v], np.int64) for s, v in values.items()}, (
            names
        )
    labels = {}
    for split, v in values.items():
        array = np.asarray(v)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise HFDatasetError(
                f"dataset {source!r}:{split}: column {column!r} holds {array.dtype} of shape "
                f"{array.shape}; expected one integer or string label per image"
            )
        if len(array) and array.min() < 0:
            raise HFDatasetError(f"dataset {source!r}:{split}: negative label {array.min()}")
        labels[split] = array.astype(np.int64)
    return labels, []


def _domains(raw: dict[str, Any], column: str) -> tuple[dict[str, np.ndarray], list[str]]:
    if not column:
        return {}, []
    values = {split: [str(x) for x in part[column]] for split, part in raw.items()}
    names = sorted({x for v in values.values() for x in v})
    index = {name: i for i, name in enumerate(names)}
    return {s: np.asarray([index[x] for x in v], np.int64) for s, v in values.items()}, names


def _common_square_size(part: Any, column: str, where: str, peek: int = 64) -> int:
    """The side of the first `peek` train images when they share one square size (MNIST-like
    sets keep their native size, as .npz files do), else 0."""
    head = part.select(range(min(peek, len(part))))
    sizes = {getattr(image, "size", None) for _, image in _decoded(head, column, where)}
    sizes.discard(None)  # undecodable rows: `_images` skips them and says so
    if len(sizes) == 1:
        ((w, h),) = sizes
        if w == h:
            return int(w)
    return 0


def _images(
    part: Any, column: str, size: int, resize: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(images, kept): every row's image at `size`, and which rows could be decoded (the others
    are zeros). Decoded one row at a time (a whole column of PIL images would hold every
    original in memory at once), with a progress line every 30 s for large sets."""
    from fgl_core.progress import PhaseProgress

    out = np.zeros((len(part), size, size, 3), np.uint8)
    kept = np.zeros(len(part), bool)
    with PhaseProgress(f"decoding {where}", len(part)) as progress:
        for i, image in _decoded(part, column, where):
            if image is not None:
                out[i], kept[i] = square_rgb(image, size, resize), True
            progress.update(1)
    return out, kept


def _decoded(part: Any, column: str, where: str) -> Iterator[tuple[int, Any]]:
    """(row, PIL image or None where the bytes cannot be decoded) for each row of `column`.

    The column is read undecoded and each row decoded here, so that one corrupt image is a
    skipped row, not an error from deep inside `datasets` that names neither row nor file."""
    from datasets import Image as ImageFeature
    from PIL import Image

    feature = part.features[column]
    if not isinstance(feature, ImageFeature):  # numbers, strings, arrays: no row is an image
        value = part[0][column] if len(part) else None
        raise HFDatasetError(
            f"{where}: row 0 of column {column!r} is {type(value).__name__}, not an image"
        )
    rows = part.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    decoder = ImageFeature(mode=feature.mode)  # as `datasets` decodes (a dataset may not)
    for i, row in enumerate(rows):
        try:
            yield i, decoder.decode_example(row[column])
        except (OSError, ValueError, Image.DecompressionBombError):  # bombs: a claimed huge size
            yield i, None
