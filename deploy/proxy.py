"""The Fleet proxy: nginx on the server host's public address, the only door a silo reaches.

    python -m deploy.proxy proxy --listen 0.0.0.0:9093 --superlink 127.0.0.1:9091 --certs certs
    nginx -p "$PWD/proxy" -c nginx.conf -e stderr -g 'daemon off;'

Flower 1.41 and 1.42 serve the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr ls`,
`flwr supernode register`) and the ServerApp's Runtime API (`acquire-task`, ...) on one HTTP port,
and the open-source Control API asks nobody who they are. A silo must reach the Fleet API, so on
the SuperLink's own port it would reach the rest too: submit code that runs on the server host,
register keys, or claim the run's ServerApp task. So the SuperLink listens on loopback only, and
this proxy, on the public address, forwards what a SuperNode sends and refuses everything else:

- `POST /v1/fleet/<name>`, the request line exactly that (no `..`, no escapes, no query), and
  `GET /health`; any other method, path or spelling gets 403 from nginx itself;
- TLS ends here, with the certificate deploy/certs.py made for the server's real address; the hop
  to the SuperLink is TLS again, checked against the deployment's CA (Flower's SuperNode
  authentication needs a TLS SuperLink, so the loopback hop is encrypted too);
- the headers SuperNode authentication signs and carries (`flwr-public-key`, `flwr-signature`,
  `flwr-timestamp`: a signature over the timestamp, checked by the SuperLink) pass unchanged, as
  does the protobuf body; nothing is buffered to disk (`proxy_*buffering off`).

`--superlink` is an address (`127.0.0.1:9091`, or `superlink:9093` in compose, then with
`--resolver`, Docker's DNS, so that a restarted SuperLink container's new address is found);
`--certs` the folder deploy/certs.py wrote, or none for an insecure SuperLink (the compose demo
on one machine). docs/deployment.md shows the file this writes, line by line.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from deploy.certs import Certificates

CONFIG = "nginx.conf"
FLEET_PATHS = r"^/v1/fleet/[a-z-]+$"  # the Fleet API's routes, spelled as a SuperNode spells them
REFUSED = "refused: this port serves SuperNodes only\\n"


def upstream_name(superlink: str) -> str:
    """The name the SuperLink's certificate is checked against: nginx checks DNS names only, so
    a loopback address is checked as `localhost` (deploy/certs.py puts both in every
    certificate)."""
    host = superlink.rsplit(":", 1)[0].strip("[]")
    try:
        return "localhost" if ipaddress.ip_address(host).is_loopback else host
    except ValueError:
        return host


def nginx_config(
    listen: str, superlink: str, certs: Path | None, resolver: str | None = None
) -> str:
    """The proxy's nginx.conf: `listen` is nginx's `listen` (address:port or port), `superlink`
    the SuperLink's host:port, `certs` the folder of deploy/certs.py's files as the proxy reads
    them (None: plain HTTP on both hops)."""
    scheme = "https" if certs is not None else "http"
    tls = ""
    upstream_tls = ""
    if certs is not None:
        files = Certificates(certs)
        tls = (
            f"        ssl_certificate {files.server_cert};\n"
            f"        ssl_certificate_key {files.server_key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
        upstream_tls = (
            f"        proxy_ssl_trusted_certificate {files.ca};\n"
            "        proxy_ssl_verify on;\n"
            f"        proxy_ssl_name {upstream_name(superlink)};\n"
        )
    dns = f"    resolver {resolver} valid=10s ipv6=off;\n" if resolver else ""
    return f"""\
# The Fleet proxy of an FGL-on-Flower server host, written by `python -m deploy.proxy`.
# Run: nginx -p <this folder> -c {CONFIG} -e stderr -g 'daemon off;'  (docs/deployment.md)
worker_processes 1;
pid nginx.pid;
error_log stderr notice;

events {{
    worker_connections 512;
}}

http {{
    access_log /dev/stdout;
    server_tokens off;
    default_type text/plain;
    client_body_temp_path temp-body;
    proxy_temp_path temp-proxy;
    fastcgi_temp_path temp-fastcgi;
    uwsgi_temp_path temp-uwsgi;
    scgi_temp_path temp-scgi;
{dns}
    server {{
        listen {listen}{" ssl" if certs is not None else ""};
{tls}
        set $superlink {superlink};
        client_max_body_size 64m;
        proxy_http_version 1.1;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout 5m;
        proxy_send_timeout 5m;
{upstream_tls}
        location /v1/fleet/ {{
            limit_except POST {{ deny all; }}
            if ($request_uri !~ "{FLEET_PATHS}") {{ return 403 "{REFUSED}"; }}
            proxy_pass {scheme}://$superlink;
        }}

        location = /health {{
            limit_except GET {{ deny all; }}
            if ($request_uri != "/health") {{ return 403 "{REFUSED}"; }}
            proxy_pass {scheme}://$superlink;
        }}

        location / {{
            return 403 "{REFUSED}";
        }}
    }}
}}
"""


def write_config(
    folder: Path, listen: str, superlink: str, certs: Path | None, resolver: str | None = None
) -> Path:
    """`folder/nginx.conf` (the folder is nginx's prefix: its pid and temporary folders go there);
    its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG
    path.write_text(nginx_config(listen, superlink, certs, resolver))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="nginx's prefix: nginx.conf is written here")
    parser.add_argument("--listen", default="0.0.0.0:9093", help="the public address:port")
    parser.add_argument(
        "--superlink", default="127.0.0.1:9091", help="the SuperLink's host:port (loopback)"
    )
    parser.add_argument(
        "--certs", type=Path, help="deploy/certs.py's folder (omit for an insecure SuperLink)"
    )
    parser.add_argument("--resolver", help="a DNS server for --superlink's name (compose)")
    args = parser.parse_args(argv)
    certs = args.certs.resolve() if args.certs is not None else None
    if certs is not None:
        files = Certificates(certs)
        needed = (files.ca, files.server_cert, files.server_key)
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            print(
                f"error: no {', '.join(missing)}: run python -m deploy.certs first", file=sys.stderr
            )
            return 1
    path = write_config(args.folder.resolve(), args.listen, args.superlink, certs, args.resolver)
    print(f"wrote {path}: run nginx -p {path.parent} -c {CONFIG} -e stderr -g 'daemon off;'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
