"""Datasets as in-memory uint8 arrays: scikit-learn digits, MedMNIST-layout .npz files,
ImageFolder trees (optionally one level of domains), MedMNIST names and Hugging Face datasets
(`hf:`, `fgl_core.hf_datasets`).

Every source ends up as `DatasetSplits`: RGB uint8 images (N, H, W, 3), int64 labels, a
train/val/test split and the class names that prompts are built from. Augmentation is not
done here: the training loop applies it per batch, so nothing random is frozen into arrays.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fgl_core.config import DataSettings, RunConfig
from fgl_core.hf_datasets import HFDatasetError, is_hf, load_hf_splits
from fgl_core.image_ops import square_rgb
from fgl_core.npy import read_npy_header

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # data splits are fixed across run seeds, so every seed sees the same test set
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
FOLDER_DEFAULT_SIZE = 64
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; more is a corrupt label, not a task

# Class names of the single-label MedMNIST v2 sets, in label order (from the MedMNIST INFO table).
MEDMNIST_CLASS_NAMES: dict[str, list[str]] = {
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "breastmnist": ["malignant", "normal or benign"],
    "retinamnist": [f"diabetic retinopathy grade {grade}" for grade in range(5)],
    "pneumoniamnist": ["normal", "pneumonia"],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
}


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names the source and what is wrong."""


@dataclass(frozen=True)
class ImageSet:
    """Images (N, H, W, 3) uint8, labels (N,) int64, optional domain index per image."""

    images: np.ndarray
    labels: np.ndarray
    domains: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> ImageSet:
        domains = None if self.domains is None else self.domains[indices]
        return ImageSet(self.images[indices], self.labels[indices], domains)

    def label_histogram(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()


@dataclass(frozen=True)
class DatasetSplits:
    source: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: list[str]
    domain_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])


def load_dataset(config: RunConfig | DataSettings, source: str | None = None) -> DatasetSplits:
    """Load `source` (default: the config's `dataset`), then resize, split and subset it as the
    config's data keys say (`DataSettings`)."""
    cfg = DataSettings.of(config)
    source = source or cfg.dataset
    path = Path(source).expanduser()
    if source == "digits":
        splits, names, domains = _load_digits()
    elif is_hf(source):
        splits, names, domains = _load_hf(cfg, source)
    elif path.suffix == ".npz":
        splits, names = _load_npz(path)
        domains = []
    elif path.is_dir():
        splits, names, domains = _load_image_folder(
            path, cfg.image_size or FOLDER_DEFAULT_SIZE, cfg.resize
        )
    elif path.is_file():
        raise DatasetError(
            f"dataset {source!r} is a file but not an .npz archive; expected 'digits', a "
            "MedMNIST-layout '.npz' file, an ImageFolder directory or a MedMNIST name"
        )
    elif source.lower() in MEDMNIST_CLASS_NAMES or source.lower().endswith("mnist"):
        splits, names = _load_medmnist(source.lower(), Path(cfg.cache_dir))
        domains = []
    else:
        raise DatasetError(
            f"dataset {source!r}: no such file or directory. Expected 'digits', a MedMNIST-layout "
            "'.npz' file, an ImageFolder directory (train/<class>/..., test/<class>/...), a "
            "MedMNIST name such as 'bloodmnist', or a Hugging Face dataset as 'hf:<id or dir>'"
        )
    for split in ("train", "test"):
        if len(splits[split]) == 0:
            raise DatasetError(f"dataset {source!r}: the {split} split has no images")
    names = _resolve_class_names(source, cfg.class_name_list, names, splits)
    train, val, test = splits["train"], splits.get("val"), splits["test"]
    if val is None:
        train, val = _carve(train, cfg.val_fraction)
    if cfg.image_size and cfg.image_size != train.images.shape[1]:
        train, val, test = (_resize(s, cfg.image_size, cfg.resize) for s in (train, val, test))
    if cfg.train_subset:
        train = _stratified_subset(train, cfg.train_subset)
    if cfg.eval_subset:
        val, test = (
            _stratified_subset(val, cfg.eval_subset),
            _stratified_subset(test, cfg.eval_subset),
        )
    return DatasetSplits(source, train, val, test, names, domains)


# --- sources -------------------------------------------------------------------------------


def train_test_split(*arrays, **options):  # type: ignore[no-untyped-def]
    """scikit-learn's, imported on first use: it pulls in scipy, slow to import, which a process
    loading a dataset that needs no split (an `.npz` with its own val split, no subset) skips."""
    from sklearn.model_selection import train_test_split as split

    return split(*arrays, **options)


def _load_digits() -> tuple[dict[str, ImageSet], list[str], list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8, values 0..16
    labels = digits.target.astype(np.int64)
    tr, te = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=SPLIT_SEED
    )
    full = ImageSet(_to_rgb(images, "digits"), labels)
    return {"train": full.take(tr), "test": full.take(te)}, [str(d) for d in range(10)], []


def _load_hf(cfg: DataSettings, source: str) -> tuple[dict[str, ImageSet], list[str], list[str]]:
    try:
        arrays, names, domain_names = load_hf_splits(cfg, source)
    except HFDatasetError as err:
        raise DatasetError(str(err)) from None
    splits = {
        split: ImageSet(images, labels, domains if domain_names else None)
        for split, (images, labels, domains) in arrays.items()
    }
    return splits, names, domain_names


def _load_npz(path: Path) -> tuple[dict[str, ImageSet], list[str]]:
    if not path.is_file():
        raise DatasetError(
            f"dataset file {str(path)!r} does not exist (looked in {str(path.resolve().parent)!r})"
        )
    arrays = _read_npz(path)
    keys = set(arrays)
    missing = {"train_images", "train_labels", "test_images", "test_labels"} - keys
    if missing:
        raise DatasetError(
            f"dataset file {str(path)!r} lacks {sorted(missing)} (it holds {sorted(keys)}); "
            "the MedMNIST layout is train_/val_/test_ + images/labels"
        )
    splits = {}
    for split in ("train", "val", "test"):
        if f"{split}_images" in arrays and f"{split}_labels" in arrays:
            where = f"{path}:{split}"
            images = _to_rgb(arrays[f"{split}_images"], where)
            labels = _to_labels(arrays[f"{split}_labels"], len(images), where)
            splits[split] = ImageSet(images, labels)
    names = [str(name) for name in arrays["classes"].tolist()] if "classes" in arrays else []
    return splits, names


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz`, each header checked against its member's size before anything
    is allocated; any damage is a `DatasetError` naming the file and the member."""
    arrays = {}
    member = "(the archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member = info.filename
                if not member.endswith(".npy"):
                    continue
                with archive.open(info) as f:
                    read_npy_header(f, info.file_size)  # before a byte is allocated
                with archive.open(info) as f:
                    arrays[member.removesuffix(".npy")] = np.lib.format.read_array(
                        f, allow_pickle=False
                    )
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise DatasetError(
            f"dataset file {str(path)!r} is not a readable .npz archive ({member}): "
            f"{type(err).__name__}: {err}"
        ) from None
    return arrays


def _load_image_folder(
    root: Path, size: int, resize: str = "squash"
) -> tuple[dict[str, ImageSet], list[str], list[str]]:
    if (root / "train").is_dir():
        trees = {"": root}
    else:
        trees = {d.name: d for d in sorted(root.iterdir()) if (d / "train").is_dir()}
        if not trees:
            raise DatasetError(
                f"dataset directory {str(root)!r} has neither train/<class>/ nor "
                "<domain>/train/<class>/ subdirectories"
            )
    classes = sorted(
        {
            c.name
            for tree in trees.values()
            for s in ("train", "val", "test")
            if (tree / s).is_dir()
            for c in (tree / s).iterdir()
            if c.is_dir()
        }
    )
    from PIL import Image

    domain_names = [d for d in trees if d]
    splits = {}
    for split in ("train", "val", "test"):
        images, labels, domains, unreadable = [], [], [], []
        for d_index, tree in enumerate(trees.values()):
            for label, name in enumerate(classes):
                folder = tree / split / name
                files = sorted(folder.iterdir()) if folder.is_dir() else []
                for file in files:
                    if file.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    try:
                        images.append(_read_image(file, size, resize))
                    except (OSError, ValueError, Image.DecompressionBombError):
                        unreadable.append(str(file))  # bombs too: a claimed 100000 px square
                        continue
                    labels.append(label)
                    domains.append(d_index)
        if unreadable:
            log.warning(
                "skipped %d unreadable images in %s/%s, e.g. %s",
                len(unreadable),
                root,
                split,
                unreadable[:3],
            )
        if images:
            splits[split] = ImageSet(
                np.stack(images),
                np.asarray(labels, np.int64),
                np.asarray(domains, np.int64) if domain_names else None,
            )
    for split in ("train", "test"):
        if split not in splits:
            raise DatasetError(f"dataset directory {str(root)!r} has no readable {split} images")
    counts = np.bincount(
        np.concatenate([s.labels for s in splits.values()]), minlength=len(classes)
    )
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(
            f"dataset directory {str(root)!r}: the class folders {empty} hold no readable image "
            "in any split; remove them or add images"
        )
    return splits, [c.replace("_", " ") for c in classes], domain_names


def _load_medmnist(name: str, cache_dir: Path) -> tuple[dict[str, ImageSet], list[str]]:
    offline_hint = (
        f'Offline, pass a local file instead: dataset = "/path/to/{name}_28.npz" '
        "(the MedMNIST .npz layout: train_images, train_labels, val_..., test_...)"
    )
    try:
        import medmnist
    except ImportError:
        raise DatasetError(
            f"dataset {name!r} is a MedMNIST name; loading it by name needs the 'medmnist' "
            f"package (pip install 'fgl-flower[medmnist]') and network access. {offline_hint}"
        ) from None
    if name not in medmnist.INFO:
        raise DatasetError(f"dataset {name!r} is not a MedMNIST name ({sorted(medmnist.INFO)})")
    data_class = getattr(medmnist, medmnist.INFO[name]["python_class"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    try:
        for split in ("train", "val", "test"):
            part = data_class(split=split, download=True, root=str(cache_dir))
            images = _to_rgb(np.asarray(part.imgs), f"{name}:{split}")
            splits[split] = ImageSet(images, _to_labels(np.asarray(part.labels), len(images), name))
    except Exception as err:  # medmnist raises bare RuntimeErrors for network failures
        raise DatasetError(
            f"dataset {name!r} could not be downloaded: {err}. {offline_hint}"
        ) from None
    return splits, []


# --- normalisation -------------------------------------------------------------------------


def _to_rgb(images: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, 1|3) integer images in [0, 255] -> (N, H, W, 3) uint8."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(
            f"{where}: images have shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3)"
        )
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise DatasetError(
                f"{where}: images are {images.dtype} in [{images.min()}, {images.max()}]; "
                "expected uint8 (or integers in 0..255)"
            )
        images = images.astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


def _to_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{where}: labels have shape {labels.shape} and dtype {labels.dtype}; expected "
            "(N,) or (N, 1) integers (multi-label sets are not supported)"
        )
    if len(labels) != n:
        raise DatasetError(f"{where}: {len(labels)} labels for {n} images")
    if n and labels.min() < 0:
        raise DatasetError(f"{where}: negative label {labels.min()}")
    return labels.astype(np.int64)


def _read_image(file: Path, size: int, resize: str = "squash") -> np.ndarray:
    """`file` as a size x size RGB array: stretched ("squash"), or its shorter side scaled to
    `size` and the centre square kept ("shorter-side")."""
    from PIL import Image

    with Image.open(file) as image:
        return square_rgb(image, size, resize)


def _resolve_class_names(
    source: str, configured: list[str], carried: list[str], splits: dict[str, ImageSet]
) -> list[str]:
    num_classes = 1 + max(int(s.labels.max()) for s in splits.values() if len(s))
    if num_classes > MAX_CLASSES:
        raise DatasetError(
            f"dataset {source!r}: a label of {num_classes - 1} means {num_classes} classes; "
            f"at most {MAX_CLASSES} are supported (a corrupt label?)"
        )
    stem = Path(source).stem.lower().split("_")[0]
    for origin, names in (
        ("config 'class-names'", configured),
        ("the dataset's 'classes'", carried),
        ("the MedMNIST table", MEDMNIST_CLASS_NAMES.get(stem, [])),
    ):
        if names:
            if len(names) < num_classes:
                raise DatasetError(
                    f"dataset {source!r}: labels go up to {num_classes - 1} but {origin} names "
                    f"only {len(names)} classes: {names}"
                )
            return list(names)
    present = np.unique(np.concatenate([s.labels for s in splits.values()]))
    if len(present) < num_classes:
        absent = sorted(set(range(num_classes)) - set(present.tolist()))
        raise DatasetError(
            f"dataset {source!r}: labels go up to {num_classes - 1} but {len(absent)} classes "
            f"have no image in any split (e.g. {absent[:5]}) and nothing names the classes; "
            "give 'class-names' (or a 'classes' array in the .npz) if that is intended"
        )
    log.warning("dataset %r carries no class names; using 'class 0', 'class 1', ...", source)
    return [f"class {i}" for i in range(num_classes)]


def _carve(train: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    """Hold out a stratified validation split for model selection (test only reports)."""
    idx = np.arange(len(train))
    try:
        tr, va = train_test_split(
            idx, test_size=fraction, stratify=train.labels, random_state=SPLIT_SEED
        )
    except ValueError:  # a class with a single sample cannot be stratified
        tr, va = train_test_split(idx, test_size=fraction, random_state=SPLIT_SEED)
    return train.take(np.sort(tr)), train.take(np.sort(va))


def _stratified_subset(data: ImageSet, size: int) -> ImageSet:
    if size >= len(data):
        return data
    idx = np.arange(len(data))
    try:
        keep, _ = train_test_split(
            idx, train_size=size, stratify=data.labels, random_state=SPLIT_SEED
        )
    except ValueError:
        keep, _ = train_test_split(idx, train_size=size, random_state=SPLIT_SEED)
    return data.take(np.sort(keep))


def _resize(data: ImageSet, size: int, resize: str = "squash") -> ImageSet:
    """Resize once at load (antialiased bilinear); deterministic, so not augmentation.
    "shorter-side" keeps the aspect ratio: the shorter side becomes `size`, then the centre."""
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scaled = (size, size)
    if resize == "shorter-side" and h != w:
        scaled = (size, round(w * size / h)) if h < w else (round(h * size / w), size)
    x = F.interpolate(x, size=scaled, mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ImageSet(images, data.labels, data.domains)
