"""The hook's journal: one JSON line per hook call, for audits and tests.

Writing it is best effort: a full or read-only disk must not change what the
hook decides, so failures are logged and otherwise ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pagefusion import paths

log = logging.getLogger(__name__)

JOURNAL_MAX_BYTES = 1 << 20


def _rotate(path: Path) -> None:
    try:
        if path.stat().st_size > JOURNAL_MAX_BYTES:
            os.replace(path, path.with_suffix(path.suffix + ".1"))
    except FileNotFoundError:
        pass


def record(**fields: Any) -> None:
    """Append one hook call to the journal."""
    path = paths.hook_journal()
    line = json.dumps({"time": time.time(), **fields}, sort_keys=True) + "\n"
    try:
        paths.ensure_private_dir(path.parent)
        _rotate(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as err:
        log.warning("could not write the hook journal %s: %s", path, err)


def read(path: Path | None = None) -> list[dict[str, Any]]:
    """Every call in the journal (the rotated part first), oldest first."""
    path = path or paths.hook_journal()
    calls: list[dict[str, Any]] = []
    for part in (path.with_suffix(path.suffix + ".1"), path):
        try:
            text = part.read_text()
        except FileNotFoundError:
            continue
        calls.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return calls
