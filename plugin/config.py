"""pagefusion's host configuration, ``/etc/pagefusion/pagefusion.conf``.

An INI file; every key is optional::

    [worker]
    # CPU a fusion worker may use, in percent of one core, averaged over a minute
    cpu_budget_percent = 2
    # pages fingerprinted per pass at most
    pages_per_pass = 65536

    [metrics]
    # where the daemon serves Prometheus metrics; "off" disables it
    listen = 127.0.0.1:9177

    [ksm]
    # what to do with a page-fusion domain when KSM is missing or read-only:
    # "refuse" its start, or "allow" it to run without fusion
    unavailable = refuse
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from pagefusion.errors import HostError

CONFIG_PATH = Path(os.environ.get("PAGEFUSION_CONFIG", "/etc/pagefusion/pagefusion.conf"))


@dataclass(frozen=True)
class Config:
    worker_cpu_budget_percent: float = 2.0
    worker_pages_per_pass: int = 65536
    metrics_listen: str = "127.0.0.1:9177"
    ksm_unavailable: str = "refuse"

    @property
    def worker_cpu_budget(self) -> float:
        """The worker's CPU budget as a fraction of one core."""
        return self.worker_cpu_budget_percent / 100.0


def _number(parser, section, key, default, kind, low, high):
    text = parser.get(section, key, fallback=None)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise HostError(
            f"{CONFIG_PATH}: [{section}] {key} = {text!r} is not valid;"
            f" use a number from {low} to {high}"
        )
    return value


def parse(text: str) -> Config:
    parser = configparser.ConfigParser()
    try:
        parser.read_string(text, source=str(CONFIG_PATH))
    except configparser.Error as err:
        first_line = str(err).splitlines()[0]
        raise HostError(f"{CONFIG_PATH} is not a valid INI file: {first_line}") from None
    defaults = Config()
    unavailable = parser.get("ksm", "unavailable", fallback=defaults.ksm_unavailable)
    if unavailable not in ("refuse", "allow"):
        raise HostError(
            f"{CONFIG_PATH}: [ksm] unavailable = {unavailable!r} is not valid;"
            " use 'refuse' or 'allow'"
        )
    return Config(
        worker_cpu_budget_percent=_number(
            parser, "worker", "cpu_budget_percent", defaults.worker_cpu_budget_percent,
            float, 0.1, 100.0,
        ),
        worker_pages_per_pass=_number(
            parser, "worker", "pages_per_pass", defaults.worker_pages_per_pass, int, 16, 1 << 24
        ),
        metrics_listen=parser.get("metrics", "listen", fallback=defaults.metrics_listen),
        ksm_unavailable=unavailable,
    )  # fmt: skip


_loaded: tuple[object, Config] | None = None


def load() -> Config:
    """The host's configuration; defaults where the file or a key is absent.

    Read again whenever the file changes: the daemon serves hook calls for
    as long as it runs, and each must see the policy in force.
    """
    global _loaded
    try:
        info = CONFIG_PATH.stat()
        stamp: object = (info.st_ino, info.st_mtime_ns, info.st_size)
    except FileNotFoundError:
        stamp = None
    if _loaded is not None and _loaded[0] == stamp:
        return _loaded[1]
    try:
        loaded = parse(CONFIG_PATH.read_text()) if stamp is not None else Config()
    except FileNotFoundError:
        loaded = Config()
    _loaded = (stamp, loaded)
    return loaded
