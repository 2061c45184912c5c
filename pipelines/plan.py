"""The stages of one paper table: synth/index -> extract -> pack -> train phases -> eval -> table.

Each stage is a command line (run in the run folder, paths relative to it) and a key: a hash of
its command and of its dependencies' keys, so a changed setting re-runs what depends on it only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from flowprep.kinetics import kinetics_csvs
from pipelines.config import (
    DEFAULT_LAYOUT,
    INDEX_FORMATS,
    DatasetSpec,
    PipelineConfig,
    PipelineError,
)
from strnet.config import ConfigError, load_config

PY = [sys.executable, "-m"]


@dataclass
class Stage:
    """One cached step: `command` (argv, run in the run folder) writes into `output` only."""

    name: str  # e.g. train/UCF101/split1/motion
    kind: str  # synth, index, extract, pack, train, eval, fuse or table
    command: list[str]  # argv; paths relative to the run folder
    output: str  # folder the stage owns (removed when its key changes)
    deps: list[str] = field(default_factory=list)  # names of stages it reads from
    key: str = ""  # hash of command and deps' keys, set by `plan`
    ok_codes: tuple[int, ...] = (0,)  # exit codes that count as success


def stage_key(stage: Stage, keys: dict[str, str]) -> str:
    """SHA-256 over the stage's command and its dependencies' keys."""
    blob = json.dumps({"command": stage.command, "deps": [keys[d] for d in stage.deps]})
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_paths(name: str, ds: DatasetSpec, data: dict[str, Path]) -> tuple[str, str, bool]:
    """(videos folder, split folder, rendered here?) of a dataset; user roots must exist."""
    videos, splits = DEFAULT_LAYOUT[ds.kind]
    videos, splits = ds.videos or videos, ds.splits_dir or splits
    root = data.get(name) or (Path(ds.root) if ds.root else None)
    if root is None:
        if ds.kind != "synthetic":
            raise PipelineError(f"dataset {name}: no data root; give --data {name}=ROOT")
        base = f"data/{name}"
        return f"{base}/{videos}", f"{base}/{splits}", True
    root = root.expanduser().resolve()
    marker = "classInd.txt" if ds.kind in ("synthetic", "ucf101") else ""
    for sub, what in ((videos, "video folder"), (splits, "split folder")):
        if not (root / sub).is_dir():
            raise PipelineError(f"data root {root} is not a {ds.kind} dataset: no {what} {sub!r}")
    if marker and not (root / splits / marker).is_file():
        where = str(PurePosixPath(splits) / marker)
        raise PipelineError(f"data root {root} is not a {ds.kind} dataset: no {where!r}")
    if ds.kind == "kinetics" and not kinetics_csvs(root / splits):
        raise PipelineError(
            f"data root {root} is not a kinetics dataset: no CSV with a youtube_id column "
            f"in {splits!r}"
        )
    return str(root / videos), str(root / splits), False


def prepare_stages(name: str, ds: DatasetSpec, cfg: PipelineConfig, data: dict) -> list[Stage]:
    """Render (synthetic), index, extract RGB + flow, and pack one dataset into shards."""
    videos, splits, render = dataset_paths(name, ds, data)
    prep, p, stages = f"prep/{name}", cfg.prepare, []
    deps: list[str] = []
    if render:
        s = ds.synth
        cmd = PY + ["pipelines", "synth", "-o", f"data/{name}", "--per-class", str(s.per_class)]
        cmd += ["--frames", str(s.frames), "--size", f"{s.size[0]}x{s.size[1]}"]
        cmd += ["--seed", str(s.seed)] + (["--classes", ",".join(s.classes)] if s.classes else [])
        stages.append(Stage(f"synth/{name}", "synth", cmd, f"data/{name}"))
        deps = [stages[-1].name]
    index = PY + ["flowprep", "index", videos, "-s", splits, "-o", f"{prep}/index/manifest.jsonl"]
    index += ["--format", INDEX_FORMATS[ds.kind]]
    stages.append(Stage(f"index/{name}", "index", index, f"{prep}/index", deps))
    extract = PY + ["flowprep", "extract", f"{prep}/index/manifest.jsonl", "--video-root", videos]
    extract += ["-o", f"{prep}/frames", "--modality", p.modality, "--short-side", str(p.short_side)]
    extract += ["--flow-backend", p.flow_backend, "--flow-compile", p.flow_compile]
    extract += ["--flow-batch", str(p.flow_batch), "-j", str(p.jobs), "-q"]
    # exit 3: some videos failed; they are listed in failures.jsonl and left out of the lists
    stages.append(
        Stage(
            f"extract/{name}",
            "extract",
            extract,
            f"{prep}/frames",
            [f"index/{name}"],
            ok_codes=(0, 3),
        )
    )
    pack = PY + ["flowprep", "pack", f"{prep}/frames", "-o", f"{prep}/shards"]
    stages.append(
        Stage(
            f"pack/{name}",
            "pack",
            pack + ["--shard-size", p.shard_size],
            f"{prep}/shards",
            [f"extract/{name}"],
        )
    )
    return stages


def phase_ref(ref: str, dataset: str, split: int) -> tuple[str, str]:
    """(stage name, checkpoint path) of a phase reference `phase` or `Dataset:phase`."""
    ds, _, phase = ref.rpartition(":")
    folder = f"train/{ds or dataset}/split{split}/{phase}"
    return folder, f"{folder}/checkpoint.pt"


def train_stage(cfg: PipelineConfig, dataset: str, split: int, phase: str) -> Stage:
    """`strnet train` of one phase on one split, with the table's and the phase's overrides."""
    spec = cfg.phases[phase]
    out, deps = f"train/{dataset}/split{split}/{phase}", [f"pack/{dataset}"]
    values = {**cfg.train, **spec.set}
    values.update({"data.root": f"prep/{dataset}/shards", "data.split": split})
    values["run.device"] = cfg.device
    for key in ("init", "init_appearance", "init_motion"):
        # a phase of the table, else a file given in the overrides, else nothing (not the
        # shipped config's runs/... default, which belongs to hand-run phases)
        ref = getattr(spec, key)
        if ref:
            stage, values[f"model.{key}"] = phase_ref(ref, dataset, split)
            deps.append(stage)
        else:
            values.setdefault(f"model.{key}", "")
    overrides = [f"{k}={toml_value(v)}" for k, v in values.items()]
    try:  # unknown keys and ill-typed values fail now, before any stage runs
        data = load_config(spec.config, overrides).data
    except ConfigError as exc:
        raise PipelineError(f"phase {phase}: {exc}") from None
    written = {"both": ("rgb", "flow")}.get(cfg.prepare.modality, (cfg.prepare.modality,))
    for stream, used in (("rgb", data.use_rgb), ("flow", data.use_flow)):
        if used and stream not in written:
            raise PipelineError(
                f"phase {phase} reads {stream} but prepare.modality is "
                f"{cfg.prepare.modality!r}: use both"
            )
    cmd = PY + ["strnet", "train", spec.config, "--out", out, "-q"]
    for item in overrides:
        cmd += ["--set", item]
    return Stage(out, "train", cmd, out, deps)


def toml_value(value) -> str:
    """A value as TOML text for strnet's `--set key=value` (strings quoted)."""
    return json.dumps(value) if isinstance(value, str | list | bool | int | float) else str(value)


def eval_stages(cfg: PipelineConfig, dataset: str, split: int, phase: str) -> list[Stage]:
    """`strnet eval` of one phase with the table's protocol; scores saved for fusing later."""
    e, out = cfg.evaluation, f"eval/{dataset}/split{split}/{phase}"
    cmd = PY + ["strnet", "eval", f"train/{dataset}/split{split}/{phase}/checkpoint.pt"]
    cmd += ["--split", str(split), "--data", f"prep/{dataset}/shards", "--out", out]
    cmd += ["--name", phase, "--protocol", e.protocol, "--test-chunks", str(e.test_chunks)]
    cmd += ["-j", str(e.jobs), "--device", cfg.device]
    return [Stage(out, "eval", cmd, out, [f"train/{dataset}/split{split}/{phase}"])]


def scores_file(dataset: str, split: int, name: str) -> str:
    """Where the eval or fuse stage `name` leaves its per-video scores."""
    return f"eval/{dataset}/split{split}/{name}/{name}_split{split}_scores.npz"


def result_file(dataset: str, split: int, name: str) -> str:
    """Where the eval or fuse stage `name` leaves its metrics JSON."""
    return f"eval/{dataset}/split{split}/{name}/{name}_split{split}.json"


def fuse_stage(dataset: str, split: int, key: str, phases: list[str]) -> Stage:
    """A fused column (e.g. two-stream late fusion): average saved scores, no model runs."""
    out = f"eval/{dataset}/split{split}/{key}"
    cmd = PY + ["strnet", "eval"] + [scores_file(dataset, split, p) for p in phases]
    cmd += ["--fuse", "--split", str(split), "--out", out, "--name", key]
    return Stage(out, "fuse", cmd, out, [f"eval/{dataset}/split{split}/{p}" for p in phases])


def plan(cfg: PipelineConfig, data: dict[str, Path] | None = None) -> list[Stage]:
    """Every stage of the table in run order, with keys; raises PipelineError on bad input."""
    data = data or {}
    unknown = [n for n in data if n not in cfg.datasets]
    if unknown:
        raise PipelineError(
            f"--data names unknown dataset {unknown[0]!r}; known: {', '.join(cfg.datasets)}"
        )
    stages: list[Stage] = []
    for name, ds in cfg.datasets.items():
        stages += prepare_stages(name, ds, cfg, data)
    column_names = []
    for name in cfg.datasets:
        for split in cfg.splits:
            for phase in cfg.phases:
                stages.append(train_stage(cfg, name, split, phase))
                stages += eval_stages(cfg, name, split, phase)
            for col in cfg.columns:
                if len(col.phases) > 1:
                    stages.append(fuse_stage(name, split, col.key, col.phases))
                column_names.append(
                    f"eval/{name}/split{split}/{col.key if len(col.phases) > 1 else col.phases[0]}"
                )
    table = Stage("table", "table", ["(in process) pipelines.report.write_table"], "", column_names)
    stages.append(table)
    keys: dict[str, str] = {}
    known = {s.name for s in stages}
    for s in stages:
        missing = [d for d in s.deps if d not in known or d not in keys]
        if missing:
            raise PipelineError(f"stage {s.name} needs {missing[0]}, which does not run before it")
        s.key = keys[s.name] = stage_key(s, keys)
    return stages
