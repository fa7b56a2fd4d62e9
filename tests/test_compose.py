"""The compose files, checked by parsing (tests/test_compose_up.py runs the demo's two variants).

Every Flower service runs one of Flower's own programs unchanged: `flower-superlink` and
`flower-supernode` from Flower's images, `flower-superexec` from the app image (built `FROM
flwr/superexec`); the Fleet proxy is nginx with the configuration deploy/proxy.py writes. Every
command is parsed by Flower's own argument parsers (the installed version, which the images must
match), every address must name a service and its port, every mounted certificate must be one
that deploy/certs.py writes, the flags must be those the loopback launcher gives Flower's
processes (tests/test_deployment.py runs those for real), and the networks must keep the silos to
the proxy: the SuperLink is on a network no silo joins, each silo on one of its own. The server
host's and a silo host's files are the demo's two sides.
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
from deploy.images import PROXY_IMAGE, is_flower
from deploy.proxy import nginx_config
from tests.conftest import ROOT

SILOS = 3
# containers: process isolation, listening on all of the container's addresses, state on a volume,
# the SuperExec secret (the launcher runs on one machine's loopback, without them)
COMPOSE_ONLY = {"--isolation", "--host", "--database", "--superexec-auth-secret-file"}
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
SERVER_SIDE = {"superlink", "fleet-proxy", "superexec-serverapp"}


def flwr_pin() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [d for d in project["dependencies"] if is_flower(d)]
    return pin.split("==")[1]


def with_defaults(text: str) -> str:
    """compose's `${VAR:-default}` as compose reads it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


def load_file(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def load(name: str) -> dict:
    return load_file(name)["services"]


def merged(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override`: commands replaced, volumes added (or replaced, at the
    same path), mappings (such as a healthcheck) merged key by key."""
    services = {name: dict(service) for name, service in base.items()}
    for name, changes in override.items():
        assert name in services, f"the override names an unknown service {name!r}"
        for key, value in changes.items():
            if key == "volumes":  # by the path in the container: an override's replaces the base's
                by_target = {v.split(":")[1]: v for v in services[name].get("volumes", [])}
                by_target |= {v.split(":")[1]: v for v in value}
                services[name]["volumes"] = list(by_target.values())
            elif isinstance(value, dict) and isinstance(services[name].get(key), dict):
                services[name][key] = {**services[name][key], **value}
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
    """container path -> host path (compose's defaults filled in), `:ro` kept on the path"""
    result = {}
    for volume in service.get("volumes", []):
        source, target, *mode = with_defaults(volume).split(":")
        result[target] = source + (":ro" if mode == ["ro"] else "")
    return result


def assert_app_image(service: dict) -> None:
    """Built from deploy/Dockerfile on the pinned Flower (its superexec image), run with that
    image's own entrypoint, `flower-superexec`."""
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert with_defaults(service["build"]["args"]["FLWR_VERSION"]) == flwr_pin()
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M))
    assert set(service["build"]["args"]) <= declared, declared
    assert "entrypoint" not in service


def assert_flower_service(name: str, service: dict) -> None:
    """One of Flower's programs as Flower ships it, with nothing phoning home, restarted a
    bounded number of times."""
    assert "fgl_accel" not in str(service) and "python" not in str(service.get("entrypoint"))
    assert service["restart"] == "on-failure:5", name
    assert service["environment"] == FLOWER_ENV, name


def check_server_side(services: dict, certs: Certificates | None, proxy_bind: str) -> int:
    """The SuperLink, its ServerApp's SuperExec and the Fleet proxy; the SuperLink's port."""
    version = flwr_pin()
    link = services["superlink"]
    assert with_defaults(link["image"]) == f"flwr/superlink:{version}"
    assert "entrypoint" not in link
    link_args = parse(superlink_parser(), link["command"])
    port = link_args.port
    assert link_args.isolation == "process" and link_args.host == "0.0.0.0"
    assert flags(link["command"]) - COMPOSE_ONLY == flags(superlink_args(port, certs))
    # its state on a volume; its own port for the operator, on the host's loopback only
    assert Path(link_args.database).parent == Path("state")
    assert mounts(link)["/app/state"] == "./state"
    assert [with_defaults(p) for p in link["ports"]] == [f"127.0.0.1:9091:{port}"]
    assert set(link["networks"]) == {"server", "operator"}
    assert "/health" in str(link["healthcheck"]["test"])

    proxy = services["fleet-proxy"]
    assert proxy["image"] == PROXY_IMAGE and proxy["restart"] == "on-failure:5"
    assert proxy["command"] == ["nginx", "-e", "stderr", "-g", "daemon off;"]
    conf = mounts(proxy)["/etc/nginx/nginx.conf"]
    assert conf.endswith(":ro")
    in_container = Path("/etc/nginx/certs") if certs is not None else None
    expected = nginx_config("9093", f"superlink:{port}", in_container, "127.0.0.11")
    assert (ROOT / conf.removesuffix(":ro")).read_text() == expected, (
        f"{conf} is not what `python -m deploy.proxy` writes for compose"
    )
    assert [with_defaults(p) for p in proxy["ports"]] == [f"{proxy_bind}:9093:9093"]
    assert "server" in proxy["networks"] and "operator" not in proxy["networks"]
    assert "/health" in str(proxy["healthcheck"]["test"])
    assert proxy["depends_on"]["superlink"]["condition"] == "service_healthy"

    serverapp = services["superexec-serverapp"]
    assert_app_image(serverapp)
    exec_args = parse(superexec_parser(), serverapp["command"])
    assert exec_args.runtime_api_address == f"superlink:{port}"
    assert serverapp["networks"] == ["server"]
    assert mounts(serverapp)["/app/outputs"] == "./outputs"
    assert exec_args.insecure == (certs is None)
    if certs is not None:
        assert exec_args.root_certificates == str(certs.ca)
        secret = str(certs.superexec_secret)
        assert link_args.superexec_auth_secret_file == secret
        assert exec_args.superexec_auth_secret_file == secret
        for name, target in (("superlink", f"/app/{secret}"),
                             ("superexec-serverapp", f"/app/{secret}")):  # fmt: skip
            assert mounts(services[name])[target] == f"./{secret}:ro"
        for file in ("ca.crt", "server.pem", "server.key"):
            assert mounts(proxy)[f"/etc/nginx/certs/{file}"] == f"./certs/{file}:ro"
    for name in SERVER_SIDE - {"fleet-proxy"}:
        assert_flower_service(name, services[name])
    return port


def check(services: dict, certs: Certificates | None) -> None:
    """docker-compose.yml (with docker-compose.tls.yml where `certs`): the server side, and three
    silos, each on a network of its own that only the proxy shares."""
    version = flwr_pin()
    names = set(SERVER_SIDE)
    names |= {f"{kind}-{i}" for kind in ("supernode", "superexec-clientapp") for i in (1, 2, 3)}
    assert set(services) == names
    port = check_server_side(services, certs, proxy_bind="127.0.0.1")
    networks = load_file("docker-compose.yml")["networks"]
    assert networks["server"]["internal"] is True

    partitions = Topology.partitions(SILOS).node_configs
    for i in range(1, SILOS + 1):
        node = services[f"supernode-{i}"]
        assert with_defaults(node["image"]) == f"flwr/supernode:{version}"
        assert "entrypoint" not in node
        assert_flower_service(f"supernode-{i}", node)
        node_args = parse(supernode_parser(), node["command"])
        assert node_args.superlink == "fleet-proxy:9093"  # the proxy, never the SuperLink
        assert node_args.isolation == "process" and node_args.host == "0.0.0.0"
        assert node_args.node_config == node_config_string(partitions[i - 1])
        key = certs.node_key(i - 1) if certs else None
        expected = supernode_args("fleet-proxy:9093", node_args.port, "", certs, key)
        assert flags(node["command"]) - COMPOSE_ONLY == flags(expected)
        clientapp = services[f"superexec-clientapp-{i}"]
        assert_app_image(clientapp)
        assert_flower_service(f"superexec-clientapp-{i}", clientapp)
        exec_args = parse(superexec_parser(), clientapp["command"])
        assert exec_args.runtime_api_address == f"supernode-{i}:{node_args.port}"
        assert exec_args.insecure  # the silo's own network
        # the silo's own network: its SuperNode, its ClientApp container and the proxy alone
        own = f"silo-{i}"
        assert node["networks"] == [own] and clientapp["networks"] == [own]
        assert networks[own]["internal"] is True
        members = {name for name, service in services.items() if own in service.get("networks", [])}
        assert members == {f"supernode-{i}", f"superexec-clientapp-{i}", "fleet-proxy"}
        if certs is not None:
            for flag in ("--root-certificates", "--auth-supernode-private-key"):
                path = node["command"][node["command"].index(flag) + 1]
                assert mounts(node)[f"/app/{path}"] == f"./{path}:ro", (i, flag)
    if certs is not None:
        for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
            command = services["superlink"]["command"]
            path = command[command.index(flag) + 1]
            assert mounts(services["superlink"])[f"/app/{path}"] == f"./{path}:ro", flag
    assert port == 9093


def test_compose_matches_the_launcher_and_flowers_own_flags():
    check(load("docker-compose.yml"), certs=None)


def test_compose_tls_variant_matches_the_launcher_and_deploy_certs():
    services = merged(load("docker-compose.yml"), load("docker-compose.tls.yml"))
    check(services, certs=Certificates(Path("certs")))


def test_the_server_hosts_compose_file_is_the_demos_server_side_open_to_other_hosts():
    demo = merged(load("docker-compose.yml"), load("docker-compose.tls.yml"))
    server = load("docker-compose.server.yml")
    assert set(server) == SERVER_SIDE
    check_server_side(server, Certificates(Path("certs")), proxy_bind="0.0.0.0")
    for name in SERVER_SIDE:
        for key in ("image", "command", "environment", "restart", "healthcheck", "depends_on"):
            assert server[name].get(key) == demo[name].get(key), (name, key)
        assert sorted(server[name].get("volumes", [])) == sorted(demo[name].get("volumes", []))
    assert set(server["fleet-proxy"]["networks"]) == {"server", "public"}
    assert load_file("docker-compose.server.yml")["networks"]["server"]["internal"] is True


def test_a_silo_hosts_compose_file_connects_out_with_its_key_and_mounts_its_data_read_only():
    silo = load("docker-compose.silo.yml")
    demo = merged(load("docker-compose.yml"), load("docker-compose.tls.yml"))
    assert set(silo) == {"supernode", "superexec-clientapp"}
    node, clientapp = silo["supernode"], silo["superexec-clientapp"]
    assert_flower_service("supernode", node)
    assert_flower_service("superexec-clientapp", clientapp)
    assert_app_image(clientapp)
    command = [re.sub(r"\$\{FGL_SERVER:\?[^}]*\}", "server.example.org", with_defaults(token))
               for token in node["command"]]  # fmt: skip
    node_args = parse(supernode_parser(), command)
    assert node_args.superlink == "server.example.org:9093"
    assert node_args.node_config == 'data-path="/data/silo.npz"'
    assert flags(command) == flags(demo["supernode-1"]["command"])
    assert mounts(node)["/app/certs/silo.key"] == "./certs/supernode-0:ro"
    assert mounts(node)["/app/certs/ca.crt"] == "./certs/ca.crt:ro"
    assert mounts(clientapp)["/data"] == "./data:ro"  # the silo's data, read-only
    exec_args = parse(superexec_parser(), clientapp["command"])
    assert exec_args.runtime_api_address == f"supernode:{node_args.port}"
    networks = load_file("docker-compose.silo.yml")["networks"]
    assert clientapp["networks"] == ["silo"] and networks["silo"]["internal"] is True
    assert set(node["networks"]) == {"silo", "outside"}


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


def test_a_server_certificate_lacking_an_asked_for_name_is_made_again_from_the_same_ca(tmp_path):
    import stat

    from deploy.certs import covers, make_certificates

    certs = make_certificates(tmp_path, supernodes=1)
    ca, first = certs.ca.read_bytes(), certs.server_cert.read_bytes()
    assert covers(certs.server_cert, ["127.0.0.1", "localhost", "superlink", "fleet-proxy"])
    assert stat.S_IMODE(certs.superexec_secret.stat().st_mode) == 0o600
    secret = certs.superexec_secret.read_bytes()
    assert len(secret) == 64 and not secret.endswith(b"\n")  # Flower reads the exact bytes
    make_certificates(tmp_path, supernodes=1)  # nothing new asked: all kept
    assert certs.server_cert.read_bytes() == first
    make_certificates(tmp_path, supernodes=1, extra_names=["10.77.0.1"])
    assert certs.server_cert.read_bytes() != first and covers(certs.server_cert, ["10.77.0.1"])
    assert certs.ca.read_bytes() == ca and certs.superexec_secret.read_bytes() == secret
