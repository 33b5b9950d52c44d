"""The host daemon: a libvirt event loop that enforces the shut-off rule.

libvirt reports every define and metadata change as an event within
milliseconds. Callbacks run on libvirt's event thread and only queue the
domain's UUID; the main thread drains the queue and reconciles each domain
(``guard.reconcile``), so a slow libvirt call never stalls event delivery.
When libvirtd goes away the daemon reconnects and reconciles every domain,
which also catches changes made while it was disconnected. It also runs the
hook's calls that the hook's native front hands over (``hookserver``), so
that libvirtd does not wait for a Python start on every call.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable

import libvirt

from pagefusion import config, exporter, guard, hookserver, ledger, pacing, paths, supervision
from pagefusion.connection import open_connection
from pagefusion.element import NAMESPACE, STAMP_NAMESPACE
from pagefusion.errors import HostError, PagefusionError

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = 1.0
# Periodic work (replace dead workers, pace KSM) runs every TICK_S while KSM
# scans fast or a new domain settles, every QUIET_TICK_S otherwise. A domain
# that starts or stops, a worker's new report, or fused memory falling (a
# cheap look every TICK_S) brings the next tick forward.
TICK_S = 1.0
QUIET_TICK_S = 5.0
# How long to gather events before acting, so a burst for one domain (an
# edit gives DEFINED, then METADATA_CHANGE) costs one reconcile.
GATHER_S = 0.05
# Metadata changes that concern the daemon: the element, the running stamp,
# and changes whose namespace libvirt does not say.
WATCHED_NAMESPACES = (NAMESPACE, STAMP_NAMESPACE, None)


def pidfile() -> str:
    return str(paths.RUN_DIR / "daemon.pid")


class Daemon:
    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri
        self.pending: queue.Queue[str | None] = queue.Queue()
        self.stopping = threading.Event()
        self.conn: libvirt.virConnect | None = None
        # Every tick: replace workers that died, then pace KSM by their reports.
        self.pacing = pacing.PacingTask()
        self.periodic: list[Callable[[libvirt.virConnect], object]] = [
            lambda _conn: supervision.ensure_all(),
            self.pacing,
        ]
        self.tick_soon = threading.Event()
        self._callbacks: list[int] = []
        self._lock_fd: int | None = None
        self.metrics_server = None
        self.hook_server = hookserver.HookServer()

    # -- libvirt callbacks (event thread): queue only -----------------------

    def _on_lifecycle(self, _conn, dom, event, _detail, _opaque) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STOPPED):
            self.tick_soon.set()
        if event in (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_STARTED):
            self.pending.put(dom.UUIDString())

    def _on_metadata(self, _conn, dom, kind, nsuri, _opaque) -> None:
        if kind == libvirt.VIR_DOMAIN_METADATA_ELEMENT and nsuri in WATCHED_NAMESPACES:
            self.pending.put(dom.UUIDString())

    def _on_close(self, _conn, reason, _opaque) -> None:
        log.warning("libvirt connection closed (reason %s); reconnecting", reason)
        self.pending.put(None)

    # -- main thread ---------------------------------------------------------

    def _connect(self) -> libvirt.virConnect:
        conn = open_connection(self.uri)
        conn.setKeepAlive(5, 3)
        conn.registerCloseCallback(self._on_close, None)
        self._callbacks = [
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None
            ),
        ]
        log.info("connected to %s, watching domain events", conn.getURI())
        return conn

    def _reconcile(self, uuid: str) -> None:
        try:
            dom = self.conn.lookupByUUIDString(uuid)
            guard.reconcile(dom)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                log.debug("domain %s vanished before it was reconciled", uuid)
                return
            if not self.conn.isAlive():
                raise
            log.warning("domain %s: libvirt refused the reconcile: %s", uuid, err)
        except PagefusionError as err:
            log.warning("domain %s: %s", uuid, err)

    def reconcile_all(self) -> None:
        uuids = [dom.UUIDString() for dom in self.conn.listAllDomains()]
        for uuid in uuids:
            self._reconcile(uuid)
        removed = ledger.prune(set(uuids))
        if removed:
            log.info("forgot %d ledger entries of long-gone domains", removed)

    def _drain(self, timeout_s: float) -> bool:
        """Reconcile queued domains; False when the connection must be renewed."""
        try:
            first = self.pending.get(timeout=timeout_s)
        except queue.Empty:
            return True
        time.sleep(GATHER_S)
        batch = [first]
        while not self.pending.empty():
            batch.append(self.pending.get_nowait())
        if None in batch:
            return False
        for uuid in dict.fromkeys(batch):
            if uuid:
                self._reconcile(uuid)
        return True

    def _session(self) -> None:
        self.conn = self._connect()
        try:
            self.reconcile_all()
            next_tick = next_look = 0.0
            while not self.stopping.is_set() and self.conn.isAlive():
                now = time.monotonic()
                looking = now >= next_look
                if looking:
                    next_look = now + TICK_S
                if (
                    now >= next_tick
                    or self.tick_soon.is_set()
                    or (looking and self.pacing.needs_decision())
                ):
                    self.tick_soon.clear()
                    self._tick()
                    next_tick = time.monotonic() + self._tick_interval_s()
                wait_s = min(next_look, next_tick) - time.monotonic()
                if not self._drain(max(0.0, wait_s)):
                    return
        finally:
            self._disconnect()

    def _tick_interval_s(self) -> float:
        decision = self.pacing.previous
        if decision is not None and decision.mode in ("slow", "idle"):
            return QUIET_TICK_S
        return TICK_S

    def _tick(self) -> None:
        for task in self.periodic:
            try:
                task(self.conn)
            except (OSError, PagefusionError) as err:
                # One failing task (KSM read-only, a full disk) must not stop
                # the others or the enforcement of the shut-off rule.
                log.warning("periodic task failed: %s", err)

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for callback in self._callbacks:
            try:
                conn.domainEventDeregisterAny(callback)
            except libvirt.libvirtError:
                pass
        try:
            conn.unregisterCloseCallback()
            conn.close()
        except libvirt.libvirtError:
            pass

    def _take_pidfile(self) -> None:
        paths.ensure_private_dir(paths.RUN_DIR)
        fd = os.open(pidfile(), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HostError(f"another pagefusion daemon runs (lock {pidfile()} is held)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _serve_metrics(self) -> None:
        try:
            self.metrics_server = exporter.serve(config.load().metrics_listen)
        except PagefusionError as err:
            # Metrics are for watching; enforcing the rule matters more.
            log.warning("no metrics endpoint: %s", err)

    def _serve_hook_calls(self) -> None:
        try:
            self.hook_server.start()
        except OSError as err:
            # The hook runs its calls itself then, only slower.
            log.warning("not serving hook calls on %s: %s", self.hook_server.path, err)

    def run(self) -> None:
        self._take_pidfile()
        self._serve_hook_calls()
        self._serve_metrics()
        libvirt.virEventRegisterDefaultImpl()
        loop = threading.Thread(target=self._event_loop, name="libvirt-events", daemon=True)
        loop.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

        while not self.stopping.is_set():
            try:
                self._session()
            except (HostError, libvirt.libvirtError) as err:
                log.warning("libvirt unavailable: %s", err)
            if not self.stopping.is_set():
                self.stopping.wait(RECONNECT_DELAY_S)
        self.hook_server.stop()
        log.info("daemon stopped")

    def _event_loop(self) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def stop(self) -> None:
        self.stopping.set()
        self.pending.put("")


def daemon_pid() -> int | None:
    """The pid of the running daemon, or None (its pidfile lock is free)."""
    try:
        fd = os.open(pidfile(), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return int(os.read(fd, 32).decode().strip() or 0) or None
    else:
        return None
    finally:
        os.close(fd)
