"""Small Hugging Face datasets built from the shared MedMNIST files, in each local format the
loader reads, and as a hub id in the `datasets` cache (what a connected machine keeps after
downloading it; `HF_HUB_OFFLINE=1` then loads it without the network)."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import numpy as np

SPLITS = {"train": "train", "val": "validation", "test": "test"}


def blood_dict(npz: Path, classes: list[int], per_class: dict[str, int], names: list[str]):
    """A DatasetDict (train / validation / test) of `per_class[split]` images of each class in
    `classes`, with an `Image` column and a `ClassLabel` naming all of `names`."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage
    from PIL import Image

    features = Features({"image": HFImage(), "label": ClassLabel(names=names)})
    out = {}
    with np.load(npz, allow_pickle=False) as archive:
        for split, hf_split in SPLITS.items():
            labels = archive[f"{split}_labels"][:, 0]
            keep = np.concatenate(
                [np.flatnonzero(labels == c)[: per_class[split]] for c in classes]
            )
            images = [Image.fromarray(a) for a in archive[f"{split}_images"][keep]]
            out[hf_split] = Dataset.from_dict(
                {"image": images, "label": labels[keep].tolist()}, features=features
            )
    return DatasetDict(out)


def save_parquet(dataset_dict, root: Path) -> Path:
    """`root/data/<split>-00000-of-00001.parquet`, the hub's own layout."""
    (root / "data").mkdir(parents=True)
    for split, part in dataset_dict.items():
        part.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def save_imagefolder(dataset_dict, root: Path) -> Path:
    """`root/<split>/<class name>/<n>.png`."""
    for split, part in dataset_dict.items():
        names = part.features["label"].names
        for n, row in enumerate(part):
            folder = root / split / names[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / f"{n:05d}.png")
    return root


def cache_as_hub_dataset(dataset_dict, repo_id: str, hf_home: Path) -> None:
    """Put `dataset_dict` in `hf_home`'s datasets cache as `datasets` leaves a hub id it has
    downloaded and prepared: `<namespace>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow`
    beside its `dataset_info.json`."""
    import datasets

    work = hf_home.parent / f"{hf_home.name}-prepare"
    files = save_parquet(dataset_dict, work / "files") / "data"
    datasets.load_dataset(
        "parquet",
        data_files={s: str(files / f"{s}-00000-of-00001.parquet") for s in dataset_dict},
        cache_dir=str(work / "cache"),
    )
    (info,) = glob.glob(str(work / "cache" / "parquet" / "*" / "*" / "*" / "dataset_info.json"))
    prepared = Path(info).parent
    namespace, name = repo_id.split("/")
    target = hf_home / "datasets" / f"{namespace}___{name}" / "default" / "0.0.0" / prepared.name
    target.mkdir(parents=True)
    for file in prepared.iterdir():
        renamed = file.name.replace("parquet-", f"{name}-", 1)
        shutil.copy(file, target / renamed)
    shutil.rmtree(work)
    assert os.listdir(target)
