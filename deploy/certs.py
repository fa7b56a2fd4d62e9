"""Make the TLS certificates and SuperNode keys a secure deployment needs.

    python -m deploy.certs certs/ --supernodes 3 [--san superlink.example.org]

writes, under certs/:
  ca.crt, ca.key            a private certificate authority (ECDSA P-256; keep ca.key offline)
  server.pem, server.key    the SuperLink's certificate, signed by the CA, valid for
                            127.0.0.1, localhost, `superlink` (the compose service) and --san
  supernode-<i>, .pub       one ECDSA P-384 key pair per SuperNode in OpenSSH format, which is
                            what `flower-supernode --auth-supernode-private-key` reads and
                            `flwr supernode register` takes
  superexec.secret          the secret the SuperLink and the ServerApp's `flower-superexec`
                            share (`--superexec-auth-secret-file`): with `--isolation process`,
                            a process without it cannot claim the run's tasks

The certificates are made with the `openssl` command. The SuperNode keys are made with the
`cryptography` package that Flower already depends on, because openssl cannot write the
OpenSSH key format and `ssh-keygen` is not on every host. Existing files are kept: a rerun
adds missing keys and never replaces a CA that nodes already trust; a server certificate that
lacks one of the names asked for is made again, from the same CA.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# loopback (the SuperLink behind the Fleet proxy, the operator's `flwr`), and the compose services
# a SuperNode or the proxy reach it by
DEFAULT_NAMES = ("127.0.0.1", "localhost", "superlink", "fleet-proxy")
DAYS = 365


@dataclass(frozen=True)
class Certificates:
    """Where one deployment's TLS files lie."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def superexec_secret(self) -> Path:
        return self.root / "superexec.secret"

    def node_key(self, index: int) -> Path:
        return self.root / f"supernode-{index}"

    def node_public_key(self, index: int) -> Path:
        return self.root / f"supernode-{index}.pub"


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the 'openssl' command is not installed; it makes the certificates")
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _subject_alt_names(names: list[str]) -> str:
    entries = []
    for name in dict.fromkeys(names):  # ordered, no repeats
        try:
            ipaddress.ip_address(name)
            entries.append(f"IP:{name}")
        except ValueError:
            entries.append(f"DNS:{name}")
    return ",".join(entries)


def covers(certificate: Path, names: list[str]) -> bool:
    """Whether the certificate's subjectAltName lists every one of `names`."""
    proc = subprocess.run(
        ["openssl", "x509", "-in", str(certificate), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    )
    entries = proc.stdout.replace("\n", ",").split(",")
    listed = {entry.strip().split(":", 1)[-1] for entry in entries}
    return proc.returncode == 0 and set(names) <= listed


def make_ca_and_server(certs: Certificates, names: list[str]) -> None:
    """A CA and a server certificate for `names`, unless they are already there."""
    root = certs.root
    if not certs.ca.exists():
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", str(DAYS),
            "-subj", "/CN=FGL-on-Flower deployment CA",
            cwd=root,
        )  # fmt: skip
    if certs.server_cert.exists() and not covers(certs.server_cert, names):
        certs.server_cert.unlink()  # made before a name was added: a new one, from the same CA
    if not certs.server_cert.exists():
        with tempfile.TemporaryDirectory() as tmp:
            ext = Path(tmp) / "san.ext"
            ext.write_text(
                f"subjectAltName={_subject_alt_names(names)}\n"
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
            )
            csr = Path(tmp) / "server.csr"
            _openssl(
                "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", "server.key", "-out", str(csr), "-subj", f"/CN={names[0]}",
                cwd=root,
            )  # fmt: skip
            _openssl(
                "x509", "-req", "-in", str(csr), "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "server.pem", "-days", str(DAYS), "-extfile", str(ext),
                cwd=root,
            )  # fmt: skip
    for key in (root / "ca.key", certs.server_key):
        owner_only(key)


def owner_only(path: Path) -> None:
    """Take group and other access away from a key (never widen it)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        path.chmod(mode & 0o700)


@contextlib.contextmanager
def private_files():
    """Files created inside (by this process or openssl) start readable by their owner only."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_private(path: Path, data: bytes) -> None:
    """Write a key that is 0600 from its first byte, also when it replaces a wider file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def make_node_key(private: Path, public: Path) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, unless it is already there."""
    if private.exists() and public.exists():
        owner_only(private)
        return
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )


def make_secret(path: Path) -> None:
    """32 random bytes, hex (Flower reads the file's exact bytes), owner-only; kept if there."""
    if path.exists():
        owner_only(path)
        return
    write_private(path, secrets.token_hex(32).encode())


def make_certificates(root: Path, supernodes: int, extra_names: list[str] = ()) -> Certificates:
    root.mkdir(parents=True, exist_ok=True)
    certs = Certificates(root)
    with private_files():  # openssl writes ca.key and server.key 0600 from the start
        make_ca_and_server(certs, [*DEFAULT_NAMES, *extra_names])
    for public in (certs.ca, certs.server_cert):  # certificates are public: every node reads them
        public.chmod(0o644)
    for index in range(supernodes):
        make_node_key(certs.node_key(index), certs.node_public_key(index))
    make_secret(certs.superexec_secret)
    return certs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder to write into (created if missing)")
    parser.add_argument("--supernodes", type=int, default=3, help="SuperNode key pairs to make")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        help="another host name or IP address the SuperLink is reached by (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.supernodes < 0:
        parser.error("--supernodes cannot be negative")
    try:
        certs = make_certificates(args.out, args.supernodes, args.san)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"CA {certs.ca}, SuperLink certificate {certs.server_cert}, "
          f"SuperExec secret {certs.superexec_secret}")  # fmt: skip
    for index in range(args.supernodes):
        print(
            f"SuperNode {index}: {certs.node_key(index)} (public: {certs.node_public_key(index)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
