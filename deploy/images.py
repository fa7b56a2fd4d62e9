"""The images the compose files run, built on this machine when they cannot be pulled.

    python -m deploy.images                    # engine, Flower's images, the app image
    python -m deploy.images wheels DIR         # only collect the app's wheels into DIR

The compose files run Flower's official images (`flwr/superlink`, `flwr/supernode`,
`flwr/superexec` at the pinned version), the official `nginx` image for the Fleet proxy, and the
app image built `FROM flwr/superexec` by deploy/Dockerfile. Where Flower's images cannot be
pulled (no registry reachable, as here and in many hospital networks), stand-ins are built under
the same names (deploy/flower.Dockerfile): a Debian bookworm root filesystem made by
`mmdebstrap` (or `debootstrap`) from Debian's packages,
with `flwr` at the pinned version in `/python/venv`, the user `app` (UID 49999) and the
entrypoints of Flower's images, so the compose files stay exactly what a user runs; the proxy's
stand-in is Debian bookworm's own nginx (the release the tag names) with curl.

The app image is built offline: every wheel it needs is collected on this machine first
(`pip download`, with this machine's pip configuration: PyTorch is the build a `pip install -e .`
here gets) into `deploy/wheels/`, which is served on 127.0.0.1 while `docker build --network
host` runs, and the Dockerfile installs from that address with `--no-index`. The wheels (gigabytes
with a CUDA PyTorch) never enter the build context or a layer. An image whose inputs are
unchanged (the files it is built from, and the wheels) is reused, not rebuilt; a rebuild removes
the image it replaces (about 7 GB with a CUDA PyTorch), unless a container still uses it.

On a machine without a Docker engine (root only), `docker.io`, `docker-compose` and `mmdebstrap`
are installed from Debian's packages and `dockerd` is started, its networks inside 10.78.0.0/16;
`docker_engine()` stops a daemon it started.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def is_flower(requirement: str) -> bool:
    """Flower itself (`flwr[simulation]==...`), not a package named after it (`flwr-datasets`)."""
    return re.match(r"flwr(\[|[=<>~!]|$)", requirement) is not None


(FLOWER_PIN,) = [d for d in PROJECT["dependencies"] if is_flower(d)]
FLOWER_VERSION = FLOWER_PIN.split("==")[1]
FLOWER_IMAGES = {
    role: f"flwr/{role}:{FLOWER_VERSION}" for role in ("superlink", "supernode", "superexec")
}
APP_IMAGE = f"fgl-flower-app:{PROJECT['version']}"
# the Fleet proxy's image in the compose files: the official nginx image of Debian bookworm's
# release, or a stand-in under its name with Debian's own nginx (and curl, for the healthcheck)
PROXY_IMAGE = "nginx:1.22.1"
BASE_IMAGE = "fgl-base/debian-python3:bookworm"  # the stand-ins' root filesystem
APP_WHEELS = ROOT / "deploy" / "wheels"  # served to the build, never in its context
# what deploy/Dockerfile copies: a change to any of it makes a new app image
APP_SOURCES = ["pyproject.toml", "README.md", "deploy/Dockerfile", "fgl_core", "fgl_client",
               "fgl_server", "strategies"]  # fmt: skip
DOCKER_NETWORKS = ["--bip", "10.78.0.1/24", "--default-address-pool", "base=10.78.0.0/16,size=24"]
STATE = Path(tempfile.gettempdir()) / "fgl-images"  # the build lock, dockerd's log


class ImageError(RuntimeError):
    """An image could not be made; the message says what failed and where its log is."""


def run(args: list[str], what: str, timeout: float = 3600, **kwargs) -> str:
    """Run a command; its stdout, or an ImageError naming `what` with the command's last words."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ImageError(f"{what}: {err}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def say(text: str) -> None:
    print(f"[images] {text}", flush=True)


# --- the engine ---
def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "info"], capture_output=True, timeout=60)
    return proc.returncode == 0


def debian_package_installed(package: str) -> bool:
    return subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0


def install_debian_packages(packages: list[str]) -> None:
    """apt-get install, as root; a clear error otherwise."""
    missing = [p for p in packages if not debian_package_installed(p)]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ImageError(
            f"this needs the Debian packages {', '.join(missing)}: install them "
            f"(sudo apt-get install -y {' '.join(missing)}) and run again"
        )
    say(f"installing {', '.join(missing)} from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], "apt-get update", env=env)
    run(["apt-get", "install", "-y", "-q", *missing], f"apt-get install {missing}", env=env)


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """A Docker engine that answers: the running one, or one this starts (and stops after)."""
    if engine_answers():
        yield
        return
    install_debian_packages(["docker.io", "docker-compose"])
    if engine_answers():  # the package's service started one
        yield
        return
    if os.geteuid() != 0:
        raise ImageError("no Docker engine answers and only root can start one here")
    STATE.mkdir(exist_ok=True)
    log = STATE / "dockerd.log"
    say(f"starting dockerd (networks in 10.78.0.0/16; log {log})")
    with log.open("ab") as out:
        daemon = subprocess.Popen(
            ["dockerd", *DOCKER_NETWORKS], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not engine_answers():
            if daemon.poll() is not None:
                raise ImageError(f"dockerd exited with code {daemon.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise ImageError(f"dockerd did not answer within 120 s; see {log}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        say(f"stopped the dockerd this started (pid {daemon.pid})")


def image_label(image: str, label: str) -> str | None:
    """A label of a local image; None when there is no such image (or label)."""
    template = f'{{{{index .Config.Labels "{label}"}}}}'
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", template, image], capture_output=True, text=True
    )
    value = proc.stdout.strip()
    return value if proc.returncode == 0 and value not in ("", "<no value>") else None


def image_id(image: str) -> str | None:
    """A local image's ID; None when there is no such image."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def image_exists(image: str) -> bool:
    return image_id(image) is not None


def build_replacing(tag: str, build: list[str], what: str) -> None:
    """Run `docker build ... -t tag` (`build`), then remove the image `tag` named before, which
    the build left untagged: a rebuild after each source change would otherwise keep every old
    app image (gigabytes each). An old image that a container still uses, or that has another
    name, is kept, and this says so."""
    old = image_id(tag)
    run(build, what)
    if old is None or old == image_id(tag):
        return
    proc = subprocess.run(["docker", "image", "rm", old], capture_output=True, text=True)
    if proc.returncode == 0:
        say(f"removed the image {tag} named before this build ({old[7:19]})")
    else:
        say(f"kept the image {tag} named before this build ({old[7:19]}): "
            f"{proc.stderr.strip()[-300:]}")  # fmt: skip


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time on this machine (a second caller waits, then reuses the images)."""
    STATE.mkdir(exist_ok=True)
    with open(STATE / "build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- Flower's images, or stand-ins under their names ---
def ensure_base_image() -> None:
    if not image_exists(BASE_IMAGE):
        debian_image(BASE_IMAGE, ["python3", "python3-venv", "ca-certificates"])


def debian_image(image: str, packages: list[str], changes: tuple[str, ...] = ()) -> None:
    """A Debian bookworm root filesystem with `packages`, made from Debian's packages by
    mmdebstrap (or debootstrap) and imported as `image` (`changes`: Dockerfile lines such as
    CMD, applied on import)."""
    tool = shutil.which("mmdebstrap") or shutil.which("debootstrap")
    if tool is None:
        install_debian_packages(["mmdebstrap"])
        tool = shutil.which("mmdebstrap")
    assert tool is not None
    start = time.monotonic()
    say(f"building {image} with {Path(tool).name} from Debian's packages")
    include = f"--include={','.join(packages)}"
    with tempfile.TemporaryDirectory(prefix="fgl-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        if Path(tool).name == "mmdebstrap":
            tarball = Path(tmp) / "rootfs.tar"
            run([tool, "--quiet", "--variant=minbase", include, "bookworm", str(tarball)], tool)
        else:
            run([tool, "--variant=minbase", include, "bookworm", str(rootfs)], tool)
            tarball = Path(tmp) / "rootfs.tar"
            run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], "tar of the root filesystem")
        change = [arg for line in changes for arg in ("--change", line)]
        run(["docker", "import", *change, str(tarball), image], f"docker import {image}")
    say(f"{image} built in {time.monotonic() - start:.0f} s")


def ensure_proxy_image(pull: bool = True) -> str:
    """The proxy's image: already here, pulled, or a stand-in built under its name from Debian's
    nginx package. Says which."""
    if image_exists(PROXY_IMAGE):
        return "present"
    if pull:
        try:
            run(["docker", "pull", "--quiet", PROXY_IMAGE], f"docker pull {PROXY_IMAGE}",
                timeout=900)  # fmt: skip
            return "pulled"
        except ImageError as err:
            say(f"{PROXY_IMAGE} cannot be pulled ({str(err).splitlines()[-1][:160]}); "
                "building a stand-in under its name")  # fmt: skip
    debian_image(PROXY_IMAGE, ["nginx", "curl", "ca-certificates"],
                 ('CMD ["nginx", "-g", "daemon off;"]',))  # fmt: skip
    return "built"


def collect_wheels(folder: Path, requirements: list[str]) -> None:
    """Every wheel `requirements` need (for this machine's Python and platform) into `folder`;
    wheels already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    say(f"collecting wheels into {folder}")
    run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--only-binary", ":all:", "--dest", str(folder), *requirements],
        f"pip download into {folder}",
    )  # fmt: skip


def ensure_flower_images(pull: bool = True) -> str:
    """Flower's three images at the pinned version: already here, pulled, or built as
    stand-ins. Says which."""
    if all(image_exists(image) for image in FLOWER_IMAGES.values()):
        return "present"
    if pull:
        try:
            for image in FLOWER_IMAGES.values():
                run(["docker", "pull", "--quiet", image], f"docker pull {image}", timeout=900)
            return "pulled"
        except ImageError as err:
            say(f"Flower's images cannot be pulled ({str(err).splitlines()[-1][:160]}); "
                "building stand-ins under their names")  # fmt: skip
    ensure_base_image()
    wheels = STATE / f"flower-wheels-{FLOWER_VERSION}"
    collect_wheels(wheels, [f"flwr=={FLOWER_VERSION}"])
    start = time.monotonic()
    for role, image in FLOWER_IMAGES.items():
        run(
            ["docker", "build", "--quiet", "-f", str(ROOT / "deploy" / "flower.Dockerfile"),
             "--build-arg", f"BASE={BASE_IMAGE}", "--build-arg", f"FLWR_VERSION={FLOWER_VERSION}",
             "--target", role, "-t", image, str(wheels)],
            f"docker build {image}",
        )  # fmt: skip
    names = ", ".join(FLOWER_IMAGES.values())
    say(f"stand-ins for {names} built in {time.monotonic() - start:.0f} s")
    return "built"


# --- the app image ---
def app_requirements() -> list[str]:
    """What the app image installs: the project's dependencies but Flower (its base image has
    it), and the build backend for the offline install. PyTorch comes as this machine's pip
    resolves it, the same build a `pip install -e .` here gets."""
    deps = [d for d in PROJECT["dependencies"] if not is_flower(d)]
    return [*deps, *PYPROJECT["build-system"]["requires"]]


def sources_digest(requirements: list[str]) -> str:
    """What the app image is made of, hashed: the files deploy/Dockerfile copies and what it
    installs."""
    digest = hashlib.sha256("\n".join(requirements).encode())
    for source in APP_SOURCES:
        path = ROOT / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def served(folder: Path) -> Iterator[str]:
    """`folder` served over HTTP on 127.0.0.1 (a free port) while the block runs: its address,
    for pip's `--find-links` (pip trusts loopback without TLS)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format: str, *args: object) -> None:  # one line a wheel: no
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet) as server:
        thread = threading.Thread(target=server.serve_forever, name="wheels", daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join()


def prune_untagged_app_images() -> None:
    """Remove untagged app images no container uses: builds before 2026-12-06 left each replaced
    image behind (gigabytes each). Only images carrying the app image's label are touched."""
    out = run(["docker", "image", "prune", "--force", "--filter", "label=fgl.sources"],
              "docker image prune")  # fmt: skip
    freed = out.strip().splitlines()[-1] if out.strip() else ""
    if "Deleted" in out:
        say(f"removed untagged app images left by earlier builds ({freed})")


def ensure_app_image(wheels: Path = APP_WHEELS) -> str:
    """The app image, built offline from `wheels` unless one of the same inputs is here."""
    prune_untagged_app_images()
    requirements = app_requirements()
    digest = sources_digest(requirements)
    if image_label(APP_IMAGE, "fgl.sources") == digest:
        return "present"
    collect_wheels(wheels, requirements)
    start = time.monotonic()
    say(f"building {APP_IMAGE} from deploy/Dockerfile, offline from {wheels} (served on loopback)")
    with served(wheels) as address:
        build_replacing(
            APP_IMAGE,
            ["docker", "build", "--quiet", "--network", "host",
             "-f", str(ROOT / "deploy" / "Dockerfile"),
             "--build-arg", f"FLWR_VERSION={FLOWER_VERSION}",
             "--build-arg", f"WHEELS_URL={address}",
             "--label", f"fgl.sources={digest}", "-t", APP_IMAGE, str(ROOT)],
            f"docker build {APP_IMAGE}",
        )  # fmt: skip
    say(f"{APP_IMAGE} built in {time.monotonic() - start:.0f} s")
    return "built"


def ensure_images(pull: bool = True) -> dict[str, str]:
    """Flower's images, the proxy's and the app image, each present, pulled or built; what
    happened."""
    with build_lock():
        return {
            "flower": ensure_flower_images(pull),
            "proxy": ensure_proxy_image(pull),
            "app": ensure_app_image(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", choices=["build", "wheels"], default="build")
    parser.add_argument("folder", nargs="?", type=Path, help="wheels: where to collect them")
    parser.add_argument("--no-pull", action="store_true", help="build stand-ins, never pull")
    args = parser.parse_args(argv)
    try:
        if args.action == "wheels":
            collect_wheels((args.folder or APP_WHEELS).resolve(), app_requirements())
            return 0
        with docker_engine():
            made = ensure_images(pull=not args.no_pull)
        say(f"Flower's images: {made['flower']}; {PROXY_IMAGE}: {made['proxy']}; "
            f"{APP_IMAGE}: {made['app']}")  # fmt: skip
    except ImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
