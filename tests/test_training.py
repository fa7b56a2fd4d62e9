import numpy as np
import torch

from fgl_core.config import RunConfig
from fgl_core.datasets import load_dataset
from fgl_core.models import build_model, load_weights
from fgl_core.training import TrainSettings, augment_batch, evaluate_model, train_model

CPU = torch.device("cpu")


def test_a_few_epochs_on_bloodmnist_beat_chance_by_far(blood_npz):
    cfg = RunConfig.from_flower(
        {
            "dataset": str(blood_npz),
            "train-subset": 3000,
            "eval-subset": 800,
            "augment": "crop-flip",
        }
    )
    data = load_dataset(cfg)
    model = build_model("cnn", data.num_classes, data.image_size, seed=0)
    before = evaluate_model(model, data.test, CPU)
    stats = train_model(model, data.train, TrainSettings.from_config(cfg, epochs=6, seed=0), CPU)
    after = evaluate_model(model, data.test, CPU)
    majority = np.bincount(data.test.labels).max() / len(data.test)
    assert stats.num_examples == 3000 and stats.samples_per_second > 0
    assert after.accuracy > max(0.55, majority + 0.3), (before, after)
    assert after.loss < before.loss


def test_training_is_deterministic_for_a_seed(blood_npz):
    cfg = RunConfig.from_flower({"dataset": str(blood_npz), "train-subset": 256, "eval-subset": 64})
    data = load_dataset(cfg)
    results = []
    for seed in (1, 1, 2):
        model = build_model("cnn", data.num_classes, data.image_size, seed=3)
        train_model(model, data.train, TrainSettings.from_config(cfg, epochs=1, seed=seed), CPU)
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_augmentation_crops_and_flips_on_the_fly():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16) % 256
    images = images.to(torch.uint8)
    plain = augment_batch(images, "none", torch.Generator().manual_seed(0))
    assert plain.shape == (2, 3, 16, 16) and plain.min() >= -1 and plain.max() <= 1
    a = augment_batch(images, "crop-flip", torch.Generator().manual_seed(0))
    b = augment_batch(images, "crop-flip", torch.Generator().manual_seed(0))
    c = augment_batch(images, "crop-flip", torch.Generator().manual_seed(1))
    assert a.shape == plain.shape and torch.equal(a, b)
    assert not torch.equal(a, plain) or not torch.equal(c, plain)
    assert not torch.equal(a, c)


def test_resnets_use_the_small_stem_for_small_images_and_load_weights(tmp_path):
    small = build_model("resnet18", 8, 28)
    assert small.backbone.conv1.kernel_size == (3, 3)
    assert isinstance(small.backbone.maxpool, torch.nn.Identity)
    assert small(torch.zeros(2, 3, 28, 28)).shape == (2, 8)
    large = build_model("resnet34", 5, 128)
    assert large.backbone.conv1.kernel_size == (7, 7)
    path = tmp_path / "w.pt"
    torch.save(small.state_dict(), path)
    other = build_model("resnet18", 8, 28, seed=1)
    load_weights(other, path)
    assert torch.equal(other.head.weight, small.head.weight)
