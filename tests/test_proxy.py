"""The Fleet proxy (deploy/proxy.py): nginx forwards the Fleet API and /health, refuses the rest.

nginx itself runs here, on loopback, in front of a stand-in upstream that records what reaches
it: a SuperNode's request passes with its body and its authentication headers unchanged, and
every other method, path or spelling is refused by nginx before the upstream sees it. The real
SuperLink behind it, across hosts and in compose, is tests/test_hosts.py's and
tests/test_compose_up.py's.
"""

from __future__ import annotations

import http.client
import http.server
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from deploy import proxy
from deploy.certs import make_certificates
from deploy.federation import free_port
from tests.conftest import ROOT

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SIGNED = {  # the headers Flower's SuperNode authentication adds (values as it would send them)
    "flwr-public-key": "BGF1dGgta2V5LWJ5dGVz",
    "flwr-timestamp": "2026-12-07T08:00:00.000000+00:00",
    "flwr-signature": "c2lnbmF0dXJlLWJ5dGVz",
}


class Upstream(http.server.ThreadingHTTPServer):
    """Records each request that reaches it: method, path, headers, body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.seen.append((self.command, self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = do_PUT = answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def running_proxy(tmp_path_factory):
    """nginx with deploy/proxy.py's plain configuration in front of a recording upstream, once
    for the module; the proxy's port and the upstream."""
    tmp_path = tmp_path_factory.mktemp("proxy")
    upstream = Upstream()
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    port = free_port()
    proxy.write_config(tmp_path, f"127.0.0.1:{port}", f"127.0.0.1:{upstream.server_port}", None)
    nginx = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", proxy.CONFIG, "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                assert nginx.poll() is None, nginx.stderr.read().decode()
                threading.Event().wait(0.05)
        yield port, upstream
    finally:
        nginx.terminate()
        nginx.wait(10)
        upstream.shutdown()


@pytest.fixture
def fleet_proxy(running_proxy):
    """The module's proxy, its upstream's record emptied for this test."""
    running_proxy[1].seen.clear()
    return running_proxy


def ask(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One raw HTTP request (the path sent as written, `..` and escapes included)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in {"content-length": str(len(body)), **(headers or {})}.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    return response.status, response.read().decode()


def test_a_supernodes_request_passes_with_its_body_and_signed_headers_unchanged(fleet_proxy):
    port, upstream = fleet_proxy
    body = bytes(range(256)) * 4  # a protobuf body is bytes, not text
    headers = {"content-type": "application/protobuf", **SIGNED}
    status, _ = ask(port, "POST", "/v1/fleet/pull-messages", body, headers)
    assert status == 200
    ((method, path, seen_headers, seen_body),) = upstream.seen
    assert (method, path, seen_body) == ("POST", "/v1/fleet/pull-messages", body)
    for name, value in SIGNED.items():
        assert seen_headers.get(name) == value, name
    assert ask(port, "GET", "/health")[0] == 200
    assert upstream.seen[-1][:2] == ("GET", "/health")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),  # flwr run
        ("POST", "/v1/control/register-node"),  # flwr supernode register
        ("POST", "/v1/control/list-runs"),  # flwr ls
        ("POST", "/v1/runtime/acquire-task"),  # claiming the run's ServerApp task
        ("POST", "/v1/runtime/pull-task-input"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
        ("POST", "/v1/fleet/%70ull-messages"),  # an escape: not as a SuperNode spells it
        ("POST", "/v1/fleet/pull-messages?x=1"),
        ("POST", "//v1/fleet/pull-messages"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("POST", "/health"),
        ("GET", "/health/../v1/control/list-runs"),
        ("GET", "/"),
        ("GET", "/docs"),  # FastAPI's own pages
        ("GET", "/openapi.json"),
    ],
)
def test_everything_else_is_refused_by_the_proxy_before_the_superlink_sees_it(
    fleet_proxy, method, path
):
    port, upstream = fleet_proxy
    status, text = ask(port, method, path, b"x", {"content-type": "application/protobuf"})
    assert status in (400, 403), (status, text)
    assert upstream.seen == []


def test_nginx_accepts_the_tls_configuration_as_deploy_certs_makes_it(tmp_path):
    certs = make_certificates(tmp_path / "certs", supernodes=0)
    path = proxy.write_config(tmp_path / "proxy", "127.0.0.1:9093", "127.0.0.1:9091", certs.root)
    text = path.read_text()
    assert f"ssl_certificate {certs.server_cert};" in text and "proxy_ssl_verify on;" in text
    assert "proxy_ssl_name localhost;" in text  # the SuperLink's loopback, checked by name
    checked = subprocess.run(
        [NGINX, "-t", "-p", str(path.parent), "-c", proxy.CONFIG, "-e", "stderr"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_the_deployment_doc_shows_the_configuration_the_module_writes():
    text = (ROOT / "docs" / "deployment.md").read_text()
    block = text.split("<!-- proxy: nginx.conf -->\n```nginx\n", 1)[1].split("```", 1)[0]
    assert block == proxy.nginx_config("0.0.0.0:9093", "127.0.0.1:9091", Path("/srv/fgl/certs"))


def test_the_upstream_certificate_name_is_localhost_for_a_loopback_address_else_the_host():
    assert proxy.upstream_name("127.0.0.1:9091") == "localhost"
    assert proxy.upstream_name("[::1]:9091") == "localhost"
    assert proxy.upstream_name("superlink:9093") == "superlink"
    assert proxy.upstream_name("10.77.0.1:9091") == "10.77.0.1"


def test_missing_certificates_are_named_before_anything_is_written(tmp_path, capsys):
    code = proxy.main([str(tmp_path / "proxy"), "--certs", str(tmp_path / "nowhere")])
    assert code == 1
    said = capsys.readouterr().err
    assert "server.pem" in said and "deploy.certs" in said
    assert not (tmp_path / "proxy").exists()
