"""The page-fusion ledger: what each domain last ran with, and refused changes.

Kept in ``/var/lib/pagefusion/ledger/UUID.json`` across reboots:

``ran_with``
    The page-fusion value the domain ran with when it last stopped (or runs
    with now). ``restore`` compares a saved image's XML against it.
``accepted``
    The value last accepted into the persistent definition while the domain
    was shut off (by the daemon or ``pagefusion set``).
``slipped``
    A change of the element made while the domain ran that nothing undid
    (the daemon was down): ``{"from": ..., "to": ...}``. The next ``prepare``
    refuses to start until the owner confirms one value with ``pagefusion set``.

The host-wide count of refused changes lives beside them in ``counters.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pagefusion import paths, runstate
from pagefusion.element import PageFusion

log = logging.getLogger(__name__)


def _value_to_json(value: PageFusion | None) -> dict[str, object] | None:
    return None if value is None else {"state": value.state, "group": value.group}


def _value_from_json(data: dict[str, object] | None) -> PageFusion | None:
    if not data:
        return None
    return PageFusion(enabled=data.get("state") == "on", group=data.get("group"))


@dataclass
class Entry:
    uuid: str
    name: str = ""
    ran_with: PageFusion | None = None
    accepted: PageFusion | None = None
    slipped_from: PageFusion | None = None
    slipped_to: PageFusion | None = None

    @property
    def slipped(self) -> bool:
        return self.slipped_to is not None

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "ran_with": _value_to_json(self.ran_with),
                "accepted": _value_to_json(self.accepted),
                "slipped": None
                if self.slipped_to is None
                else {
                    "from": _value_to_json(self.slipped_from),
                    "to": _value_to_json(self.slipped_to),
                },
            },
            sort_keys=True,
        )


def ledger_dir() -> Path:
    return paths.STATE_DIR / "ledger"


def load(uuid: str) -> Entry:
    """The ledger entry of a domain; an empty one if there is none."""
    try:
        data = json.loads((ledger_dir() / f"{uuid}.json").read_text())
    except FileNotFoundError:
        return Entry(uuid=uuid)
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable ledger entry of %s: %s", uuid, err)
        return Entry(uuid=uuid)
    slipped = data.get("slipped") or {}
    return Entry(
        uuid=uuid,
        name=data.get("name", ""),
        ran_with=_value_from_json(data.get("ran_with")),
        accepted=_value_from_json(data.get("accepted")),
        slipped_from=_value_from_json(slipped.get("from")),
        slipped_to=_value_from_json(slipped.get("to")),
    )


def save(entry: Entry) -> None:
    runstate.write_atomically(ledger_dir() / f"{entry.uuid}.json", entry.to_json())


def accept(uuid: str, name: str, value: PageFusion, *, confirmed: bool) -> None:
    """Record ``value`` as accepted while the domain was shut off.

    A slipped change is forgotten when the owner confirms a value
    (``confirmed``: ``pagefusion set``) or changes the element to something
    else than what slipped in, which can only be a new, shut-off change.
    """
    entry = load(uuid)
    entry.name = name
    entry.accepted = value
    if entry.slipped and (confirmed or value != entry.slipped_to):
        log.info("domain %r: slipped page-fusion change settled as %s", name, value.describe())
        entry.slipped_from = entry.slipped_to = None
    save(entry)


# Entries of domains libvirt no longer knows are kept this long: a saved
# image of a transient domain may still be restored and checked against one.
FORGET_AFTER_S = 30 * 24 * 3600


def prune(known_uuids: set[str]) -> int:
    """Remove old entries of domains that no longer exist; return how many."""
    removed = 0
    cutoff = time.time() - FORGET_AFTER_S
    try:
        entries = list(ledger_dir().glob("*.json"))
    except OSError:
        return 0
    for path in entries:
        with contextlib.suppress(OSError):
            if path.stem not in known_uuids and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def _counters_locked() -> Iterator[dict[str, int]]:
    path = paths.STATE_DIR / "counters.json"
    paths.ensure_private_dir(path.parent)
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            values = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            values = {}
        yield values
        runstate.write_atomically(path, json.dumps(values, sort_keys=True))
    finally:
        os.close(lock)


def count(name: str, by: int = 1) -> None:
    with _counters_locked() as values:
        values[name] = values.get(name, 0) + by


def counters() -> dict[str, int]:
    try:
        return json.loads((paths.STATE_DIR / "counters.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


REJECTED_CHANGES = "rejected_changes_total"
REFUSED_STARTS = "refused_starts_total"
