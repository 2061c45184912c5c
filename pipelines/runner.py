"""Run planned stages with a cache: finished stages are skipped, interrupted ones continue.

A stage's record (`RUN/.stages/<name>.json`) holds its key and whether it finished. A rerun
skips a finished stage with the same key, continues an interrupted one with the same key
(`strnet train --resume`; flowprep extract/pack resume themselves) and redoes anything else
from an empty output folder. Child processes die with the runner (kill -9 included).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flowprep.atomic import lock_exclusive, release_lock, write_json_atomic
from pipelines.config import PipelineError
from pipelines.plan import Stage

RESUMABLE = ("synth", "extract", "pack")  # these commands continue by themselves when rerun
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the runner dies, so no orphan keeps writing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def record_path(run: Path, name: str) -> Path:
    return run / ".stages" / (name.replace("/", "__") + ".json")


def read_record(run: Path, name: str) -> dict:
    """The stage's record, or {} when missing or unreadable (then the stage runs again)."""
    path = record_path(run, name)
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def clear_output(run: Path, stage: Stage) -> None:
    """Remove what an older version of the stage wrote; never follow a planted symlink."""
    if not stage.output:
        return
    out = run / stage.output
    if out.is_symlink():
        raise PipelineError(f"stage {stage.name}: {out} is a symlink; refusing to clear it")
    if out.exists():
        shutil.rmtree(out)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def last_error_line(lines: list[str]) -> str:
    """The line that says why a child failed: its last `Error:` line, else its last line."""
    text = [ln.strip() for ln in lines if ln.strip()]
    for line in reversed(text):
        if "error" in line.lower():
            return line
    return text[-1] if text else "(no output)"


class Runner:
    """Runs a plan in RUN_DIR; `echo` receives one progress line at a time."""

    def __init__(self, run: Path, echo: Callable[[str], None] = print, env: dict | None = None):
        self.run, self.echo = Path(run), echo
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def execute(self, stages: list[Stage], table: Callable[[], Path]) -> dict:
        """Run every stage in order; return {name: "cached" | "ran" | "resumed"}."""
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / ".stages").mkdir(exist_ok=True)
        (self.run / "logs").mkdir(exist_ok=True)
        lock = self.run / ".lock"
        fd = lock_exclusive(lock)
        if fd is None:
            raise PipelineError(f"{self.run} is busy with another pipelines run")
        try:
            return {s.name: self.stage(s, i, len(stages), table) for i, s in enumerate(stages, 1)}
        finally:
            release_lock(lock, fd)

    def stage(self, stage: Stage, number: int, total: int, table: Callable[[], Path]) -> str:
        record = read_record(self.run, stage.name)
        head = f"[{number}/{total}] {stage.name}"
        if record.get("key") == stage.key and record.get("state") == "done":
            self.echo(f"{head}: cached")
            return "cached"
        resume = record.get("key") == stage.key and record.get("state") == "started"
        extra: list[str] = []
        if (
            resume
            and stage.kind == "train"
            and (self.run / stage.output / "checkpoint.pt").is_file()
        ):
            extra = ["--resume"]
        elif not (resume and stage.kind in RESUMABLE):
            resume = False
            clear_output(self.run, stage)
        if stage.output:
            (self.run / stage.output).mkdir(parents=True, exist_ok=True)
        path = record_path(self.run, stage.name)
        write_json_atomic(path, {"key": stage.key, "state": "started", "command": stage.command})
        hint = f" (expected ~{format_eta(record['seconds'])})" if "seconds" in record else ""
        self.echo(f"{head}: {'resuming' if resume else 'running'}{hint}")
        t0 = time.monotonic()
        if stage.kind == "table":
            table()
        else:
            self.call(stage, stage.command + extra, head)
        seconds = time.monotonic() - t0
        write_json_atomic(
            path,
            {"key": stage.key, "state": "done", "command": stage.command, "seconds": seconds},
        )
        self.echo(f"{head}: done in {format_eta(seconds)}")
        return "resumed" if resume else "ran"

    def call(self, stage: Stage, argv: list[str], head: str) -> None:
        """Run one command, its output to logs/<stage>.log; its progress lines to `echo`."""
        log_path = self.run / "logs" / (stage.name.replace("/", "__") + ".log")
        tail: list[str] = []
        last_echo = 0.0
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(
                argv,
                cwd=self.run,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line])[-50:]
                now = time.monotonic()
                if line.startswith("train step") and now - last_echo >= 5:
                    self.echo(f"{head}: {line.strip()[6:]}")
                    last_echo = now
            rc = proc.wait()
        if rc not in stage.ok_codes:
            raise PipelineError(
                f"stage {stage.name} failed (exit {rc}): {last_error_line(tail)} (log: {log_path})"
            )
