"""Checkpoints that resume a run exactly: atomic writes, `weights_only=True` loads.

A checkpoint holds model, optimizer, step (the LR schedule is a function of the step), every RNG
state, the sampler position and the resolved config, all as tensors and plain Python values.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from flowprep import atomic
from strnet.weights import WeightsError, load_file


class CheckpointError(WeightsError):
    """A missing, unreadable or incomplete training checkpoint; the message is one line."""


def rng_state() -> dict:
    """Every RNG state a run touches (Python, NumPy, torch CPU and CUDA) as loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (CUDA states only where a GPU is present)."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """`flowprep.atomic.write_atomic` into `path`, creating its folder first.

    A kill during the write leaves the previous file intact (checkpoints, saved scores). The
    temporary file is created fresh (`flowprep.atomic.open_new`: O_EXCL | O_NOFOLLOW after
    unlinking a stale one), so a symlink planted at `.<name>.tmp` is never followed; the folder
    is fsynced after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_atomic(path, write)  # also fsyncs the folder after the rename


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically (`write_atomic`): a kill keeps the previous one."""
    return write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint with `weights_only=True` (no pickled code runs).

    Raises CheckpointError with one line if the file is missing, unreadable or not a dict.
    """
    try:
        state = load_file(path, map_location)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' is not a strnet checkpoint")
    return state
