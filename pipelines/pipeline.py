"""Plan, run and report one table: the importable core of `pipelines run`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipelines.config import PipelineConfig
from pipelines.plan import dataset_paths, plan
from pipelines.report import write_table
from pipelines.runner import Runner, read_record


def classes_files(cfg: PipelineConfig, run: Path, data: dict[str, Path]) -> dict[str, Path]:
    """Where each synthetic dataset's classes.json (class -> group) lies."""
    out = {}
    for name, ds in cfg.datasets.items():
        if ds.kind == "synthetic":
            _, splits, _ = dataset_paths(name, ds, data)
            out[name] = Path(run) / splits / "classes.json"  # an absolute split dir stays as is
    return out


def run_pipeline(
    cfg: PipelineConfig,
    run: Path,
    data: dict[str, Path],
    *,
    echo: Callable[[str], None] = print,
    env: dict | None = None,
) -> Path:
    """Run every stage not yet finished under the same settings; return table.md's path."""
    run = Path(run).resolve()
    stages = plan(cfg, data)
    classes = classes_files(cfg, run, data)
    Runner(run, echo, env).execute(stages, lambda: write_table(cfg, run, classes))
    return run / "table.md"


def stage_status(cfg: PipelineConfig, run: Path, data: dict[str, Path]) -> list[tuple[str, str]]:
    """(stage, cached | partial | todo) for `--dry-run`."""
    out = []
    for s in plan(cfg, data):
        record = read_record(Path(run), s.name)
        same = record.get("key") == s.key
        state = record.get("state") if same else None
        out.append((s.name, {"done": "cached", "started": "partial"}.get(state, "todo")))
    return out
