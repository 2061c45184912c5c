"""Atomic file writes: a temporary name in the same folder, fsync, then rename.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` as indented, key-sorted JSON (stable bytes for equal data)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
