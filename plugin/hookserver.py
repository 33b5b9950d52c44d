"""The daemon's side of the hook: run hook calls the native front hands over.

A hook call in a process of its own pays Python's start and the hook's
imports, about 100 ms, and libvirtd waits for three of them per domain
start. The daemon has that code loaded, so the hook's front
(``native/hookfront.c``, whose comment holds the protocol) sends each call
here over ``/run/pagefusion/hook.sock``. Each connection gets a thread; the
call runs only after the front's 'G', so a front that gave up waiting and
runs the call itself never has it run twice. Only root may connect.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from pathlib import Path

from pagefusion import hook, paths

log = logging.getLogger(__name__)

MAGIC = b"PFH1"
U32 = struct.Struct("=I")
# A front sends its call at once; one that stalls is not waited for long.
REQUEST_TIMEOUT_S = 2.0
MAX_ARGS = 64
MAX_ARG_BYTES = 64 << 10
MAX_STDIN_BYTES = 64 << 20


class ProtocolError(Exception):
    pass


def socket_path() -> Path:
    return paths.RUN_DIR / "hook.sock"


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError("the front closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_sized(conn: socket.socket, limit: int) -> bytes:
    (size,) = U32.unpack(_recv_exact(conn, U32.size))
    if size > limit:
        raise ProtocolError(f"a part of {size} bytes is over the limit of {limit}")
    return _recv_exact(conn, size)


def read_call(conn: socket.socket) -> tuple[list[str], str]:
    """Read one call: its argv and its stdin."""
    if _recv_exact(conn, len(MAGIC)) != MAGIC:
        raise ProtocolError("not a pagefusion hook front")
    (argc,) = U32.unpack(_recv_exact(conn, U32.size))
    if argc > MAX_ARGS:
        raise ProtocolError(f"{argc} arguments")
    args = [
        _recv_sized(conn, MAX_ARG_BYTES).decode("utf-8", "surrogateescape") for _ in range(argc)
    ]
    stdin = _recv_sized(conn, MAX_STDIN_BYTES).decode("utf-8", "replace")
    return args, stdin


def encode_answer(answer: hook.Answer) -> bytes:
    out, err = answer.stdout.encode(), answer.stderr.encode()
    return b"".join((U32.pack(answer.status), U32.pack(len(out)), out, U32.pack(len(err)), err))


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class HookServer:
    """Listens on the hook socket in a thread of its own, one thread per call."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or socket_path()
        self.listener: socket.socket | None = None
        self.served = 0  # calls run and answered
        self._count_lock = threading.Lock()

    def start(self) -> None:
        paths.ensure_private_dir(self.path.parent)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Only the daemon holding the pidfile lock gets here: a socket left
        # by one that was killed is stale.
        self.path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, name="hook-server", daemon=True).start()
        log.info("serving hook calls on %s", self.path)

    def _accept(self) -> None:
        listener = self.listener
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self.serve, args=(conn,), name="hook-call", daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        """Take one call from a front, run it if the front still wants it, answer."""
        with conn:
            try:
                if _peer_uid(conn) != 0:
                    log.warning("hook socket: refused a caller that is not root")
                    return
                conn.settimeout(REQUEST_TIMEOUT_S)
                args, stdin = read_call(conn)
                conn.sendall(b"R")
                if conn.recv(1) != b"G":
                    log.info("hook call %s: the front gave up waiting and runs it itself", args[:2])
                    return
                conn.settimeout(None)
                answer = hook.handle(args, stdin, hook.SERVED_BY_DAEMON)
                with self._count_lock:
                    self.served += 1
                conn.sendall(encode_answer(answer))
            except (OSError, ProtocolError, struct.error) as err:
                log.warning("hook socket: dropped a call: %s", err)

    def stop(self) -> None:
        listener, self.listener = self.listener, None
        if listener is None:
            return
        # Unlink first: a front that finds no socket runs the call itself.
        self.path.unlink(missing_ok=True)
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        listener.close()
