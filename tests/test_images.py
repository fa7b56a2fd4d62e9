"""deploy/images.py's parts apart from the images themselves (tests/test_compose_up.py builds
those)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from deploy.images import (
    build_lock,
    build_replacing,
    docker_engine,
    image_id,
    prune_untagged_app_images,
    served,
)


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel: what pip needs to resolve and fetch it."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}/__init__.py", "")
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_served_wheels_are_what_pip_installs_from_offline_and_stop_with_the_block(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = make_wheel(wheels, "fgl_served_probe", "0.1")
    with served(wheels) as address:
        assert address.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(address + wheel.name) as answer:
            assert answer.read() == wheel.read_bytes()
        # the Dockerfile's offline install: --no-index, --find-links at the address (plain HTTP:
        # pip trusts loopback)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-index", "--find-links", address,
             "--dest", str(tmp_path / "got"), "--isolated", "fgl_served_probe==0.1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "not a trusted or secure host" not in proc.stdout + proc.stderr
        assert (tmp_path / "got" / wheel.name).read_bytes() == wheel.read_bytes()
    try:
        urllib.request.urlopen(address, timeout=5)
    except OSError:
        pass
    else:
        raise AssertionError(f"{address} still answers after the block")


def test_a_rebuild_removes_the_image_it_replaces_unless_a_container_uses_it(tmp_path):
    tag = f"fgl-test-rebuild:{os.getpid()}"
    container = f"fgl-test-rebuild-{os.getpid()}"
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY stamp /stamp\n")

    def build(stamp: str) -> str:
        (tmp_path / "stamp").write_text(stamp)
        build_replacing(tag, ["docker", "build", "--quiet", "-t", tag, str(tmp_path)], "build")
        made = image_id(tag)
        assert made is not None
        return made

    made: list[str] = []
    with docker_engine():
        try:
            made.append(build("first"))
            made.append(build("second"))
            assert made[1] != made[0]
            assert image_id(made[0]) is None  # the replaced image is gone
            # a container made from the current image keeps it through the next rebuild
            subprocess.run(["docker", "create", "--name", container, tag, "/stamp"], check=True,
                           capture_output=True)  # fmt: skip
            made.append(build("third"))
            assert image_id(made[1]) == made[1] and image_id(tag) == made[2]
        finally:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)
            subprocess.run(["docker", "image", "rm", "-f", *made], capture_output=True)


@pytest.mark.docker
@pytest.mark.images  # after .ci/run's image build: a prune must not race a build's last step
def test_untagged_app_images_are_pruned_and_nothing_else(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY stamp /stamp\n")
    (tmp_path / "stamp").write_text(str(os.getpid()))
    made = []
    with docker_engine():
        try:
            for label in ("fgl.sources=left-behind", "other.label=kept"):  # untagged builds
                proc = subprocess.run(
                    ["docker", "build", "--quiet", "--label", label, str(tmp_path)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                made.append(proc.stdout.strip())
            with build_lock():
                prune_untagged_app_images()
            assert image_id(made[0]) is None and image_id(made[1]) == made[1]
        finally:
            subprocess.run(["docker", "image", "rm", "-f", *made], capture_output=True)
