"""deploy/images.py's parts that need no Docker engine (tests/test_compose_up.py builds)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

from deploy.images import served


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
