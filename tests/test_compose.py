"""docker-compose.yml and its TLS variant, checked by parsing (tests/test_compose_up.py runs them).

Every service runs one of Flower's own programs unchanged: `flower-superlink` and
`flower-supernode` from Flower's images, `flower-superexec` from the app image (built `FROM
flwr/superexec`). Every command is parsed by Flower's own argument parsers (the installed version,
which the images must match), every address must name a service and its port, every mounted
certificate must be one that deploy/certs.py writes, and the flags must be those the loopback
launcher gives Flower's processes (tests/test_deployment.py runs those for real).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.supercore.cli.flower_superexec import _parse_args as superexec_parser
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink_parser
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode_parser

from deploy.certs import Certificates
from deploy.federation import Topology, node_config_string, superlink_args, supernode_args
from deploy.images import is_flower
from tests.conftest import ROOT

SILOS = 3
COMPOSE_ONLY = {"--isolation", "--host"}  # containers: process isolation, listen on all hosts


def flwr_pin() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if is_flower(d)]
    return pin.split("==")[1]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())["services"]


def merged(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override`: commands replaced, volumes added."""
    services = {name: dict(service) for name, service in base.items()}
    for name, changes in override.items():
        assert name in services, f"the override names an unknown service {name!r}"
        for key, value in changes.items():
            if key == "volumes":
                services[name]["volumes"] = [*services[name].get("volumes", []), *value]
            else:
                services[name][key] = value
    return services


def parse(parser: argparse.ArgumentParser, command: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(command)
    except SystemExit:
        pytest.fail(f"Flower {flwr_pin()} rejects the command {command}")


def flags(command: list[str]) -> set[str]:
    return {token for token in command if token.startswith("--")}


def mounts(service: dict) -> dict[str, str]:
    """container path -> host path"""
    pairs = (v.split(":")[:2] for v in service.get("volumes", []))
    return {target: source for source, target in pairs}


def assert_app_image(service: dict) -> None:
    """Built from deploy/Dockerfile on the pinned Flower (its superexec image), run with that
    image's own entrypoint, `flower-superexec`."""
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert service["build"]["args"]["FLWR_VERSION"] == flwr_pin()
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M))
    assert set(service["build"]["args"]) <= declared, declared
    assert "entrypoint" not in service


def check(services: dict, certs: Certificates | None) -> None:
    version = flwr_pin()
    names = {"superlink", "superexec-serverapp"}
    names |= {f"{kind}-{i}" for kind in ("supernode", "superexec-clientapp") for i in (1, 2, 3)}
    assert set(services) == names
    for name, service in services.items():  # Flower's programs, as Flower ships them
        assert "fgl_accel" not in str(service) and "python" not in str(service.get("entrypoint"))
        assert service["restart"] == "on-failure", name

    link = services["superlink"]
    assert link["image"] == f"flwr/superlink:{version}" and "entrypoint" not in link
    link_args = parse(superlink_parser(), link["command"])
    port = link_args.port
    assert link_args.isolation == "process" and link_args.host == "0.0.0.0"
    (published,) = link.get("ports", [])
    host = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", published)  # compose's ${VAR:-default}
    assert host == f"127.0.0.1:{port}:{port}"  # loopback unless the operator opens it
    assert flags(link["command"]) - COMPOSE_ONLY == flags(superlink_args(port, certs))

    runtime_of = {"superlink": port}
    partitions = Topology.partitions(SILOS).node_configs
    for i in range(1, SILOS + 1):
        node = services[f"supernode-{i}"]
        assert node["image"] == f"flwr/supernode:{version}" and "entrypoint" not in node
        node_args = parse(supernode_parser(), node["command"])
        assert node_args.superlink == f"superlink:{port}"
        assert node_args.isolation == "process" and node_args.host == "0.0.0.0"
        assert node_args.node_config == node_config_string(partitions[i - 1])
        key = certs.node_key(i - 1) if certs else None
        expected = supernode_args(f"superlink:{port}", node_args.port, "", certs, key)
        assert flags(node["command"]) - COMPOSE_ONLY == flags(expected)
        runtime_of[f"supernode-{i}"] = node_args.port

    served = []
    for name in ["superexec-serverapp", *(f"superexec-clientapp-{i}" for i in (1, 2, 3))]:
        service = services[name]
        assert_app_image(service)
        exec_args = parse(superexec_parser(), service["command"])
        host, exec_port = exec_args.runtime_api_address.split(":")
        assert runtime_of[host] == int(exec_port), f"{name} points at {host}:{exec_port}"
        served.append(host)
        talks_to_superlink = host == "superlink"
        assert exec_args.insecure == (certs is None or not talks_to_superlink)
        if certs is not None and talks_to_superlink:
            assert exec_args.root_certificates == str(certs.ca)
    assert sorted(served) == sorted(runtime_of)  # one SuperExec per SuperLink and SuperNode
    assert mounts(services["superexec-serverapp"])["/app/outputs"] == "./outputs"

    if certs is not None:  # every certificate a command names is mounted from deploy/certs.py
        for name in ["superlink", "superexec-serverapp", *(f"supernode-{i}" for i in (1, 2, 3))]:
            command, mounted = services[name]["command"], mounts(services[name])
            for flag in (
                "--ssl-ca-certfile",
                "--ssl-certfile",
                "--ssl-keyfile",
                "--root-certificates",
                "--auth-supernode-private-key",
            ):
                if flag in command:
                    path = command[command.index(flag) + 1]
                    assert mounted[f"/app/{path}"] == f"./{path}", (name, flag)


def test_compose_matches_the_launcher_and_flowers_own_flags():
    check(load("docker-compose.yml"), certs=None)


def test_compose_tls_variant_matches_the_launcher_and_deploy_certs():
    services = merged(load("docker-compose.yml"), load("docker-compose.tls.yml"))
    check(services, certs=Certificates(Path("certs")))


def test_dockerfile_builds_on_the_pinned_superexec_and_copies_the_app():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={flwr_pin()}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile
    assert re.search(r"ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu\b", dockerfile)
    copied = {  # from the build context (not from another stage), flags aside
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
        if not source.startswith("--")
    }
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    assert set(packages) <= copied and "pyproject.toml" in copied
    assert all((ROOT / path).exists() for path in copied)
    assert "fgl_accel" not in copied  # the image runs Flower's SuperExec as Flower ships it
    assert dockerfile.rstrip().endswith('ENTRYPOINT ["flower-superexec"]')


def test_private_keys_are_owner_only_from_the_start_and_never_widened(tmp_path):
    import os
    import stat

    from deploy.certs import make_certificates, make_node_key

    old = os.umask(0o022)  # a usual umask: files would start 0644
    try:
        certs = make_certificates(tmp_path, supernodes=1)
    finally:
        os.umask(old)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    for key in (tmp_path / "ca.key", certs.server_key, certs.node_key(0)):
        assert mode(key) == 0o600, key
    assert mode(certs.ca) == mode(certs.server_cert) == 0o644
    key, pub = tmp_path / "old.key", tmp_path / "old.pub"
    key.write_text("x")
    pub.write_text("y")
    key.chmod(0o644)
    make_node_key(key, pub)  # an existing key is kept, and tightened
    assert mode(key) == 0o600
    key.chmod(0o400)
    make_node_key(key, pub)
    assert mode(key) == 0o400  # never widened
