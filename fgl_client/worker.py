"""A node's warm worker: one resident process that runs the silo's messages for a run.

A deployed SuperNode starts a fresh ClientApp process for every message (Flower 1.41), and that
process imports PyTorch (about 2.6 s on a 2-core CPU) before it reads its message. With
`worker-idle-seconds = N` in a node's config (`flower-supernode --node-config`), the ClientApp
hands each message to a worker that it starts on the node's first message of a run and that
stays up between messages: the ClientApp process then imports Flower alone, and the worker runs
`fgl_client.handlers` exactly as the ClientApp process would (same functions, same seeds: the
replies are the same).

- **Where.** A Unix socket in `$TMPDIR/fgl-workers-<uid>/` (mode 0700, refused if another user
  owns it or others can enter it; the socket is 0600): only this user's processes reach it.
  Its name hashes the node, the run and where the ClientApp's code was installed, so each run
  (and each version of the app) gets a worker of its own.
- **What crosses.** Flower's own protobuf encodings of the message and the context, length-
  prefixed; the worker answers with the reply's records and the context's state (which a handler
  may change, e.g. MOON's previous model). No pickle.
- **When it ends.** After `worker-idle-seconds` without a message, or within a second of the
  process that started its ClientApp (the node's SuperExec) exiting: stopping a SuperNode stops
  its worker.
- **When it fails.** A handler's exception is raised again in the ClientApp process (its type's
  name and message), so the server hears it as before. A worker that cannot start, or dies during
  a message, costs nothing but time: the ClientApp runs that message itself and says so in the
  node's log; the next message starts a new worker.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fgl_client import app_module

IDLE_KEY = "worker-idle-seconds"  # node config: 0 (the default) runs each message in its process
START_SECONDS = 120.0  # how long a ClientApp waits for a new worker to listen
_FRAME = struct.Struct("!Q")  # each part of a request or answer: its length, then its bytes
MAX_PART_BYTES = 16 << 30  # a larger announced part is garbage, not a model
log = logging.getLogger(__name__)


class WorkerUnavailable(RuntimeError):
    """No worker could run this message; the ClientApp runs it itself."""


class HandlerFailed(RuntimeError):
    """A handler raised in the worker, of a type that is not a Python builtin."""


def idle_seconds(node_config: Mapping[str, object]) -> float:
    """The node's `worker-idle-seconds` (0 when absent): seconds >= 0, else a ValueError."""
    value = node_config.get(IDLE_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"node config {IDLE_KEY} = {value!r}: expected seconds, a number >= 0")
    return float(value)


# --- where a node's worker listens ---
def socket_dir() -> Path:
    """This user's directory of worker sockets, made 0700; refused if anyone else could use it."""
    path = Path(tempfile.gettempdir()) / f"fgl-workers-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerUnavailable(
            f"{path} is not a directory of this user's alone (owner uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}): no warm worker"
        )
    return path


def socket_path(context: Context, code_root: Path) -> Path:
    """The socket of this node's worker for this run and this installed copy of the app."""
    key = f"{code_root.resolve()}|{context.node_id}|{context.run_id}"
    return socket_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"


def code_root() -> Path:
    """The folder that holds the `fgl_client` package this process runs (the installed app)."""
    return Path(__file__).resolve().parent.parent


# --- framing: length-prefixed parts, the first a JSON header ---
def _send(conn: socket.socket, header: dict, *parts: bytes) -> None:
    for chunk in (json.dumps({**header, "parts": len(parts)}).encode(), *parts):
        conn.sendall(_FRAME.pack(len(chunk)))
        conn.sendall(chunk)


def _receive_part(conn: socket.socket) -> bytes:
    (size,) = _FRAME.unpack(_receive_exactly(conn, _FRAME.size))
    if size > MAX_PART_BYTES:
        raise ValueError(f"a part of {size} bytes announced (at most {MAX_PART_BYTES})")
    return _receive_exactly(conn, size)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"the other side closed after {got} of {size} bytes")
        got += n
    return bytes(buffer)


def _receive(conn: socket.socket, parts: int) -> tuple[dict, list[bytes]]:
    """A header and the parts it announces: `parts` of them, or none after a failure."""
    header = json.loads(_receive_part(conn))
    if not isinstance(header, dict) or header.get("parts") not in (0, parts):
        raise ValueError(f"expected a header announcing {parts} parts, got {header!r:.200}")
    return header, [_receive_part(conn) for _ in range(header["parts"])]


# --- the ClientApp's side ---
def delegate(handler: str, msg: Message, context: Context, idle: float) -> Message:
    """Run `handler` on `msg` in the node's worker (started if none listens) and return its
    reply; `context.state` takes the worker's changes. WorkerUnavailable if no worker ran it."""
    path = socket_path(context, code_root())
    try:
        conn = _connect_or_start(path, idle)
    except OSError as err:
        raise WorkerUnavailable(f"no warm worker at {path}: {err}") from err
    with conn:
        try:
            _send(
                conn,
                {"handler": handler},
                message_to_proto(msg).SerializeToString(),
                context_to_proto(context).SerializeToString(),
            )
            header, blobs = _receive(conn, 2)
        except (OSError, ValueError) as err:  # the worker died or spoke garbage mid-message
            raise WorkerUnavailable(f"the warm worker at {path} did not answer: {err}") from err
    if not header.get("ok"):
        raise _rebuilt(header)
    content, state = (recorddict_from_proto(_parse(ProtoRecordDict, b)) for b in blobs)
    context.state = state
    return Message(content=content, reply_to=msg)


def _rebuilt(header: dict) -> Exception:
    """The handler's exception as the ClientApp raises it: a builtin type as itself."""
    name, text = str(header.get("type", "Exception")), str(header.get("message", ""))
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(text)
    return HandlerFailed(f"{name}: {text}")


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One ClientApp at a time starts a node's worker."""
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _connect_or_start(path: Path, idle: float) -> socket.socket:
    if (conn := _connect(path)) is not None:
        return conn
    with _locked(path):
        if (conn := _connect(path)) is not None:  # another ClientApp started it meanwhile
            return conn
        root = code_root()  # the worker runs the same copy of the app
        paths = [str(root), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        # the worker keeps the ClientApp's working folder (relative paths), so -P matters
        args = [*app_module("fgl_client.worker"), str(path), str(os.getppid()), str(idle)]
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL)  # logs: the node's
        log.info(
            "started a warm worker (pid %d) for this node's messages (app in %s)", proc.pid, root
        )
        deadline = time.monotonic() + START_SECONDS
        while (conn := _connect(path)) is None:
            if proc.poll() is not None:
                raise OSError(f"the warm worker exited with code {proc.returncode} at start")
            if time.monotonic() > deadline:
                proc.kill()
                raise OSError(f"the warm worker did not listen within {START_SECONDS:.0f} s")
            time.sleep(0.05)
        return conn


def _parse(kind: type, blob: bytes):  # type: ignore[no-untyped-def]
    proto = kind()
    proto.ParseFromString(blob)
    return proto


# --- the worker's side ---
def serve(path: Path, watch_pid: int, idle: float) -> None:
    """Answer requests on `path` until `idle` seconds pass without one or `watch_pid` exits."""
    from fgl_client.handlers import HANDLERS  # imported before listening: ready = listening

    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a killed worker's socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    server.listen()
    server.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle and _alive(watch_pid) and path.exists():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                _answer(conn, HANDLERS)
            last = time.monotonic()
    finally:
        server.close()
        for leftover in (path, path.with_suffix(".lock")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _answer(conn: socket.socket, handlers: dict) -> None:
    try:
        header, (message_blob, context_blob) = _receive(conn, 2)
    except (OSError, ValueError) as err:
        log.warning("a warm-worker request could not be read: %s", err)
        return
    try:
        handler = handlers[str(header.get("handler"))]
        msg = message_from_proto(_parse(ProtoMessage, message_blob))
        context = context_from_proto(_parse(ProtoContext, context_blob))
        reply = handler(msg, context)
        parts = [recorddict_to_proto(r).SerializeToString() for r in (reply.content, context.state)]
        answer: tuple[dict, list[bytes]] = ({"ok": True}, parts)
    except Exception as err:  # the ClientApp raises it as the handler's own failure
        log.error("%s", traceback.format_exc().rstrip())
        answer = ({"ok": False, "type": type(err).__name__, "message": str(err)}, [])
    with contextlib.suppress(OSError):  # the ClientApp may have died meanwhile
        _send(conn, answer[0], *answer[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> None:
    from fgl_core.console import configure_logging

    configure_logging()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped: remove the socket first
    path, watch_pid, idle = Path(argv[0]), int(argv[1]), float(argv[2])
    try:
        serve(path, watch_pid, idle)
    finally:  # the socket is gone: a SIGTERM during the interpreter's exit just ends it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log.info("warm worker %d stopped (idle %.0f s, or its node stopped)", os.getpid(), idle)


if __name__ == "__main__":
    main(sys.argv[1:])
