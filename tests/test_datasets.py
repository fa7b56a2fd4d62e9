import numpy as np
import pytest
from PIL import Image

from fgl_core.config import RunConfig
from fgl_core.datasets import DatasetError, load_dataset
from fgl_core.partition import PartitionError, partition_dataset


def load(**overrides):
    return load_dataset(RunConfig.from_flower(overrides))


def test_bloodmnist_npz_loads_with_its_class_names_and_splits(blood_npz):
    data = load(dataset=str(blood_npz))
    assert data.class_names[0] == "basophil" and data.num_classes == 8
    assert (len(data.train), len(data.val), len(data.test)) == (11965, 1708, 3419)
    assert data.train.images.shape[1:] == (28, 28, 3) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int64 and data.train.labels.max() == 7


def test_grayscale_npz_becomes_rgb_and_takes_medmnist_names(breast_npz):
    data = load(dataset=str(breast_npz))
    assert data.train.images.shape[-1] == 3
    assert np.array_equal(data.train.images[..., 0], data.train.images[..., 2])
    assert data.class_names == ["malignant", "normal or benign"]


def test_config_class_names_override_and_must_cover_labels(retina_npz):
    assert load(dataset=str(retina_npz)).class_names[4] == "diabetic retinopathy grade 4"
    names = "g0,g1,g2,g3,g4"
    assert load(dataset=str(retina_npz), **{"class-names": names}).class_names[1] == "g1"
    with pytest.raises(DatasetError, match="labels go up to 4"):
        load(dataset=str(retina_npz), **{"class-names": "a,b"})


def test_digits_carves_a_validation_split_and_subsets_are_stratified():
    data = load(**{"train-subset": 300, "eval-subset": 100})
    assert data.image_size == 8 and data.num_classes == 10
    assert len(data.train) == 300 and len(data.test) == 100 and len(data.val) == 100
    assert np.bincount(data.train.labels, minlength=10).min() >= 25


def test_image_size_resizes_once_at_load(blood_npz):
    data = load(dataset=str(blood_npz), **{"image-size": 32, "train-subset": 50, "eval-subset": 20})
    assert data.train.images.shape[1:] == (32, 32, 3) and data.test.images.shape[1:] == (32, 32, 3)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "blood.npz"
    with pytest.raises(DatasetError, match="does not exist") as err:
        load(dataset=str(missing))
    assert str(missing) in str(err.value)


def test_unknown_source_says_what_is_accepted():
    with pytest.raises(DatasetError, match="Expected 'digits'"):
        load(dataset="no-such-thing")


def test_npz_without_the_medmnist_keys_lists_what_it_has(tmp_path):
    path = tmp_path / "odd.npz"
    np.savez(path, x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(2))
    with pytest.raises(DatasetError, match=r"lacks .*train_images.*it holds \['x', 'y'\]"):
        load(dataset=str(path))


def test_npz_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    objects = np.array([{"a": 1}, None], dtype=object)
    np.savez(
        path, train_images=objects, train_labels=objects, test_images=objects, test_labels=objects
    )
    with pytest.raises(DatasetError, match="not a readable"):
        load(dataset=str(path))


def test_bad_images_and_labels_are_named(tmp_path):
    path = tmp_path / "bad.npz"
    images = np.zeros((4, 5, 5), np.uint8)
    np.savez(
        path,
        train_images=images,
        train_labels=np.zeros(3, np.int64),
        test_images=images,
        test_labels=np.zeros(4, np.int64),
    )
    with pytest.raises(DatasetError, match=r"bad.npz:train: 3 labels for 4 images"):
        load(dataset=str(path))
    np.savez(
        path,
        train_images=images.astype(np.float32) + 0.5,
        train_labels=np.zeros(4),
        test_images=images,
        test_labels=np.zeros(4),
    )
    with pytest.raises(DatasetError, match="expected uint8"):
        load(dataset=str(path))


def test_medmnist_name_offline_points_to_a_local_file():
    with pytest.raises(DatasetError, match=r"pass a local file instead.*bloodmnist_28\.npz"):
        load(dataset="bloodmnist")


def write_tree(root, domains, classes, per_class=3, size=12):
    rng = np.random.default_rng(0)
    for domain in domains:
        for split in ("train", "test"):
            for name in classes:
                folder = root / domain / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_with_domains_partitions_one_domain_per_silo(tmp_path):
    write_tree(tmp_path, ["sketch", "photo"], ["red_fox", "cat"])
    (tmp_path / "photo" / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    cfg = RunConfig.from_flower({"dataset": str(tmp_path), "partition": "domain", "image-size": 16})
    data = load_dataset(cfg)
    assert data.class_names == ["cat", "red fox"]
    assert data.domain_names == ["photo", "sketch"]
    assert data.train.images.shape[1:] == (16, 16, 3)
    assert len(data.train) + len(data.val) == 12  # the unreadable file is skipped
    train, test = partition_dataset(cfg, data, 2)
    assert set(data.train.domains[train[0]]) == {0} and set(data.test.domains[test[1]]) == {1}
    with pytest.raises(PartitionError, match="2 domains and 3 silos"):
        partition_dataset(cfg, data, 3)


def test_domain_partition_needs_a_domain_level(tmp_path):
    write_tree(tmp_path, [""], ["a", "b"])
    cfg = RunConfig.from_flower({"dataset": str(tmp_path), "partition": "domain"})
    with pytest.raises(PartitionError, match="needs a dataset with a domain level"):
        partition_dataset(cfg, load_dataset(cfg), 2)


# --- damaged files: every failure names the file and the reason ---------------------------


def small_npz(path, train=12, test=6, labels=None, **extra):
    rng = np.random.default_rng(0)
    train_labels = labels if labels is not None else np.arange(train) % 3
    np.savez_compressed(
        path,
        train_images=rng.integers(0, 255, (train, 6, 6), dtype=np.uint8),
        train_labels=np.asarray(train_labels, np.int64),
        test_images=rng.integers(0, 255, (test, 6, 6), dtype=np.uint8),
        test_labels=np.arange(test, dtype=np.int64) % 3,
        **extra,
    )
    return path


def zero_bytes(path):
    path.write_bytes(b"")


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_deflate(path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("train_images.npy")
    data = bytearray(path.read_bytes())
    local = info.header_offset  # the local header gives the lengths before the stream
    name_len, extra_len = (
        int.from_bytes(data[local + k : local + k + 2], "little") for k in (26, 28)
    )
    start = local + 30 + name_len + extra_len
    data[start : start + 8] = b"\xff" * 8  # the compressed stream's first bytes
    path.write_bytes(bytes(data))


def header_of_2_to_the_40_rows(path):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (2**40, 6, 6)}
    )
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("val_images.npy", header.getvalue() + b"\0" * 64)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (zero_bytes, "not a readable .npz archive"),
        (flip_a_byte, "not a readable .npz archive"),
        (corrupt_deflate, r"not a readable .npz archive \(train_images.npy\)"),
        (header_of_2_to_the_40_rows, r"val_images.npy\): .*declares shape \(1099511627776, 6, 6\)"),
    ],
    ids=["0-bytes", "flipped-byte", "corrupt-deflate", "2^40-rows"],
)
def test_a_damaged_npz_is_named_with_its_reason(tmp_path, damage, reason):
    path = small_npz(tmp_path / "silo.npz")
    damage(path)
    with pytest.raises(DatasetError, match=f"silo.npz.*{reason}"):
        load(dataset=str(path))


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"train": 0}, "the train split has no images"),
        ({"test": 0}, "the test split has no images"),
        ({"labels": [0, 1, 2, 10**6] * 3}, r"a label of 1000000 means 1000001 classes"),
        ({"labels": [0, 1, 2, 500] * 3}, r"labels go up to 500 but 497 classes have no image"),
    ],
    ids=["empty-train", "empty-test", "label-1e6", "sparse-labels"],
)
def test_empty_splits_and_absurd_class_counts_are_refused(tmp_path, arrays, reason):
    path = small_npz(tmp_path / "odd.npz", **arrays)
    with pytest.raises(DatasetError, match=reason):
        load(dataset=str(path))


def test_an_image_folder_skips_a_decompression_bomb_and_refuses_an_empty_class(tmp_path):
    write_tree(tmp_path, [""], ["cat", "dog"])
    bomb = tmp_path / "train" / "cat" / "bomb.png"
    Image.new("1", (1, 1)).save(bomb)
    data = bytearray(bomb.read_bytes())  # the IHDR chunk claims 100000 x 100000 pixels
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    bomb.write_bytes(bytes(data))
    splits = load(dataset=str(tmp_path))
    assert len(splits.train) + len(splits.val) == 6  # the bomb skipped, the rest loaded
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DatasetError, match=r"class folders \['bird'\] hold no readable image"):
        load(dataset=str(tmp_path))


def test_shorter_side_resize_keeps_the_aspect_ratio_and_the_centre(tmp_path):
    stripes = np.zeros((20, 60, 3), np.uint8)  # red | green | blue, 20 px each, 60 px wide
    for k in range(3):
        stripes[:, 20 * k : 20 * (k + 1), k] = 255
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(stripes).save(tmp_path / split / name / "x.png")
    centre = load_dataset(
        RunConfig.from_flower(
            {"dataset": str(tmp_path), "image-size": 16, "resize": "shorter-side"}
        )
    )
    squashed = load_dataset(RunConfig.from_flower({"dataset": str(tmp_path), "image-size": 16}))
    mean = centre.test.images.reshape(-1, 3).mean(0)
    assert mean[1] > 250 and mean[0] < 5 and mean[2] < 5  # the green centre alone
    assert (squashed.test.images.reshape(-1, 3).mean(0) > 60).all()  # all three stripes
