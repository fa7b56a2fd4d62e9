import numpy as np
import pytest
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


def test_a_torchvision_checkpoint_loads_and_predicts_as_torchvision_does(tmp_path):
    from torchvision.models import resnet18, resnet50

    torch.manual_seed(0)
    reference = resnet18(num_classes=7).eval()
    with torch.no_grad():  # running statistics other than the fresh ones, so they must load
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(reference.state_dict(), tmp_path / "tv18.pt")
    model = build_model("resnet18", 7, 224, weights=str(tmp_path / "tv18.pt"), seed=5).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)

    imagenet = resnet50().eval()  # 1000 classes: the backbone loads, the head starts fresh
    wrapped = {
        "epoch": 90,
        "state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()},
    }
    torch.save(wrapped, tmp_path / "tv50.pth")
    fresh = build_model("resnet50", 10, 224, seed=1)
    loaded = build_model("resnet50", 10, 224, weights=str(tmp_path / "tv50.pth"), seed=1).eval()
    imagenet.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(loaded.backbone(x), imagenet(x), atol=1e-4)
    assert torch.equal(loaded.head.weight, fresh.head.weight)

    with pytest.raises(
        ValueError, match=r"torchvision ResNet with conv1 \(64, 3, 7, 7\).*above 64 px"
    ):
        build_model("resnet18", 7, 28, weights=str(tmp_path / "tv18.pt"))
    with pytest.raises(ValueError, match=r"tv50.pth' does not fit the model"):
        build_model("resnet18", 7, 224, weights=str(tmp_path / "tv50.pth"))


def test_random_resized_crops_are_boxes_of_the_image_resized_and_flipped():
    # every pixel holds its own column: a box resized keeps each row monotonic in it
    columns = torch.arange(64, dtype=torch.uint8).repeat(8, 3, 64, 1) * 4  # (8, 3, 64, 64)
    a = augment_batch(columns, "random-resized-crop", torch.Generator().manual_seed(0), 48)
    b = augment_batch(columns, "random-resized-crop", torch.Generator().manual_seed(0), 48)
    c = augment_batch(columns, "random-resized-crop", torch.Generator().manual_seed(1), 48)
    assert a.shape == (8, 3, 48, 48) and torch.equal(a, b) and not torch.equal(a, c)
    rows = a[:, 0]  # (8, 48, 48): each row, left to right
    steps = rows[:, :, 1:] - rows[:, :, :-1]
    rising, falling = (steps >= -1e-5).all(dim=(1, 2)), (steps <= 1e-5).all(dim=(1, 2))
    assert (rising | falling).all()  # a box, flipped or not
    assert rising.any() and falling.any()  # some flipped, some not
    span = rows.amax(dim=(1, 2)) - rows.amin(dim=(1, 2))
    assert span.min() < span.max() - 0.1  # boxes of different sizes
    assert rows.amin() >= -1 and rows.amax() <= 1  # inside the image, normalized


def test_evaluation_takes_the_centre_crop_with_imagenet_statistics():
    from fgl_core.training import IMAGENET_MEAN, IMAGENET_STD, InputSettings

    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    inputs = InputSettings(augment="random-resized-crop", crop_size=224, normalization="imagenet")
    x = inputs.for_evaluation(images)
    centre = images[:, :, 16:240, 16:240].float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert x.shape == (2, 3, 224, 224) and torch.allclose(x, (centre - mean) / std, atol=1e-5)
    crop = augment_batch(images, "crop", torch.Generator().manual_seed(0), 224)
    assert crop.shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="crop-size 300 is larger than the images"):
        augment_batch(images, "crop-flip", torch.Generator(), 300)
