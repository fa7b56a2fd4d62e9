"""Shared fixtures: the real datasets beside the checkout, and small derived files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT.parent / "shared" / "datasets"
LAUNCHER = [sys.executable, "-m", "deploy.launch"]  # run from ROOT, or with ROOT on PYTHONPATH


def shared_dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the tests use the real datasets in ../shared/datasets/ "
            "(see that folder's README)"
        )
    return path


# Each test's tier (pyproject's markers): `unit` is the fast loop (`pytest -m unit`, a few
# minutes on 2 cores); the others run whole runs in one process (`simulation`), processes of
# Flower's, nginx or network namespaces (`deployment`), or Docker (`docker`). A module all of
# one tier is named here; a module that mixes them marks its slow tests itself.
TIERS = ("simulation", "deployment", "docker")
MODULE_TIERS = {
    "test_compose_up": "docker",
    "test_hosts": "deployment",
    "test_deployment": "deployment",
    "test_crash_drills": "deployment",
    "test_proxy": "deployment",
    "test_simulation": "simulation",
    "test_baselines": "simulation",
    "test_compare": "simulation",
    "test_inprocess": "simulation",
    "test_adaptation": "simulation",
    "test_benchmarks": "simulation",
    "test_adapters": "simulation",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets its tier (unmarked ones are `unit`); tests that need the Docker images
    run last (their order otherwise kept): .ci/run builds the images beside the suite, and the
    first such test waits for that build."""
    for item in items:
        tier = MODULE_TIERS.get(item.module.__name__.rpartition(".")[2])
        if tier and not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: item.get_closest_marker("images") is not None)


@pytest.fixture(scope="session")
def blood_npz() -> Path:
    return shared_dataset("bloodmnist_28.npz")


@pytest.fixture(scope="session")
def breast_npz() -> Path:
    return shared_dataset("breastmnist_28.npz")


@pytest.fixture(scope="session")
def retina_npz() -> Path:
    return shared_dataset("retinamnist_28.npz")


@pytest.fixture(scope="session")
def blood_labels(blood_npz: Path) -> np.ndarray:
    with np.load(blood_npz, allow_pickle=False) as archive:
        return archive["train_labels"][:, 0].astype(np.int64)


@pytest.fixture(scope="session")
def blood_names(blood_npz: Path) -> list[str]:
    """The class names the server reads for blood_npz (its `classes` array: 'ig', not the
    MedMNIST table's 'immature granulocytes'); a silo's own file must carry the same."""
    with np.load(blood_npz, allow_pickle=False) as archive:
        return [str(name) for name in archive["classes"]]


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need the identity the runtime would set."""
    from deploy.inprocess import task_identity

    with task_identity():
        yield


def project_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH: `python -m deploy.…` works from
    any folder, and runs this checkout's code."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def start_launcher(args: list[str], cwd: Path) -> subprocess.Popen:
    """The launcher in the background, its stdout and stderr in one text pipe."""
    return subprocess.Popen(
        [*LAUNCHER, *args],
        cwd=cwd,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def launch(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the launcher (`python -m deploy.launch`) as a user would, from `cwd`.

    On a timeout the launcher gets SIGTERM, not SIGKILL (what `subprocess.run` sends), so that
    it stops the SuperLink and SuperNodes it started before the test fails.
    """
    command = [*LAUNCHER, *args]
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=120)
            raise AssertionError(f"the launcher ran past {timeout} s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def silo_file(path: Path, source: Path, classes: list[int], per_class: int, names: list[str]):
    """A node-local MedMNIST-layout file with some classes of `source` and its own names."""
    with np.load(source, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    out = {"classes": np.array(names)}
    for split, count in (("train", per_class), ("val", 5), ("test", 10)):
        labels = arrays[f"{split}_labels"][:, 0]
        keep = np.concatenate([np.flatnonzero(labels == c)[:count] for c in classes])
        out[f"{split}_images"] = arrays[f"{split}_images"][keep]
        out[f"{split}_labels"] = arrays[f"{split}_labels"][keep]
    np.savez(path, **out)
    return np.bincount(out["train_labels"][:, 0], minlength=len(names)).tolist()


def small_fgl_run(base: dict, tmp_path: Path, name: str, **overrides) -> dict:
    """A two-silo FGL run in one process (`deploy.inprocess`), as small as the path allows: 2
    images per class, 2 steps, 1 one-shot epoch, no rounds. Returns its results.json."""
    import json

    from deploy.inprocess import run_in_process

    run_config = {
        **base,
        "strategy": "fgl",
        "min-nodes": 2,
        "images-per-class": 2,
        "steps": 2,
        "oneshot-epochs": 1,
        "num-server-rounds": 0,
        "output-dir": str(tmp_path),
        "run-name": name,
        **overrides,
    }
    run_in_process(run_config, num_silos=2)
    return json.loads((tmp_path / name / "results.json").read_text())


def recorded_writes(store, after=None) -> list[int]:  # type: ignore[no-untyped-def]
    """The shards `store` writes from now on, in order (its `write` wrapped); `after(shard)`,
    if given, is called after each write (a test's crash or a killed worker)."""
    written: list[int] = []
    write = store.write

    def recorded(shard, images, labels):  # type: ignore[no-untyped-def]
        write(shard, images, labels)
        written.append(shard)
        if after is not None:
            after(shard)

    store.write = recorded
    return written
