"""Pipeline configs: one TOML per paper table, as plain dataclasses with type-checked overrides.

A config names the datasets (a row group each), how videos become shards (`[prepare]`), the
training phases with their strnet settings, and the table's columns with the paper's numbers.
"""

from __future__ import annotations

import copy
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from strnet.config import ConfigError, check_value, parse_override, tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATASET_KINDS = ("synthetic", "ucf101", "hmdb51", "kinetics")
# flowprep extract --modality: RGB frames, flow or both (Kinetics 3D ResNets read RGB only)
MODALITIES = ("rgb", "flow", "both")
# Names from the config become folder and file names: keep them to one safe path component.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]{0,63}$")
# Where the official layouts keep videos and split files, relative to a dataset root.
DEFAULT_LAYOUT = {
    "synthetic": ("videos", "."),
    "ucf101": ("UCF-101", "ucfTrainTestlist"),
    "hmdb51": ("hmdb51", "testTrainMulti_7030_splits"),
    # clips found by name anywhere under the root (flowprep.kinetics); the CSVs in annotations/
    "kinetics": (".", "annotations"),
}
# `flowprep index --format` of each kind (the synthetic set is written in UCF101's layout)
INDEX_FORMATS = {
    "synthetic": "ucf101",
    "ucf101": "ucf101",
    "hmdb51": "hmdb51",
    "kinetics": "kinetics",
}


class PipelineError(Exception):
    """A bad pipeline config, override, data root or failed stage; the message is one line."""


@dataclass
class SynthSettings:
    """`pipelines synth` arguments of a synthetic dataset (see pipelines.synthetic)."""

    classes: list[str] = field(default_factory=list)  # class names; empty = all eight
    per_class: int = 12  # videos per class
    frames: int = 32  # frames per video
    size: list[int] = field(default_factory=lambda: [96, 96])  # width, height (even)
    seed: int = 0  # seed of every random draw of the renderer


@dataclass
class DatasetSpec:
    """One dataset of the table: where its videos and split files are, or how to render it."""

    kind: str = "ucf101"  # synthetic, ucf101, hmdb51 or kinetics
    root: str = ""  # dataset root (--data overrides); empty for synthetic = render into the run
    videos: str = ""  # video folder relative to root; default per kind (UCF-101, hmdb51, videos, .)
    splits_dir: str = ""  # split-file folder relative to root; default per kind
    paper_row: str = ""  # which paper row stands beside ours (e.g. UCF101); default: the name
    synth: SynthSettings = field(default_factory=SynthSettings)


@dataclass
class PrepareSettings:
    """flowprep index/extract/pack options shared by every dataset of the table."""

    short_side: int = 256  # resize so the short side has this length (0 keeps the source size)
    modality: str = "both"  # what extract writes: rgb, flow or both (every phase's inputs)
    flow_backend: str = "torch"  # torch (ours) or opencv (the reference)
    flow_compile: str = "auto"  # torch.compile TV-L1: auto, on or off
    flow_batch: int = 8  # consecutive pairs per flow call
    jobs: int = 2  # videos decoded at once
    shard_size: str = "4GB"  # HDF5 shard size


@dataclass
class PhaseSpec:
    """One training phase: a shipped strnet phase config, its overrides and the phases it starts
    from (`init*` name a phase of this table, or `Dataset:phase` for another dataset's)."""

    config: str = ""  # strnet phase config: motion, appearance, st-resnet, st-resnet-star
    init: str = ""  # phase whose checkpoint initialises the whole model
    init_appearance: str = ""  # phase whose checkpoint initialises the appearance stream
    init_motion: str = ""  # phase whose checkpoint initialises the motion stream
    set: dict = field(default_factory=dict)  # strnet `--set` overrides of this phase


@dataclass
class ColumnSpec:
    """A column of the table: one phase's scores, or several phases' scores fused by averaging."""

    key: str = ""  # file-name key of the column (eval output name)
    name: str = ""  # heading, as in the paper
    phases: list[str] = field(default_factory=list)  # phases whose scores make the column
    paper: dict = field(default_factory=dict)  # paper row -> top-1 accuracy in percent


@dataclass
class EvalSettings:
    """How every phase is evaluated (strnet eval)."""

    protocol: str = "paper"  # paper: 25 chunks + flips, whole frames; center: one centre crop
    test_chunks: int = 25  # chunks sampled evenly per test video
    jobs: int = 0  # DataLoader workers of the evaluation


@dataclass
class PipelineConfig:
    """Everything `pipelines run` needs to go from videos to one paper table."""

    title: str = ""  # heading of table.md
    paper: str = ""  # where the paper's numbers come from (paper, table, split)
    splits: list[int] = field(default_factory=lambda: [1])  # splits to train and test on
    device: str = "auto"  # strnet run.device of every phase and evaluation
    datasets: dict = field(default_factory=dict)  # name -> DatasetSpec
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    train: dict = field(default_factory=dict)  # strnet `--set` overrides of every phase
    phases: dict = field(default_factory=dict)  # name -> PhaseSpec, in training order
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    columns: list = field(default_factory=list)  # ColumnSpec, in table order


TABLES = {"datasets": DatasetSpec, "phases": PhaseSpec}


def shipped_configs() -> list[str]:
    """Names of the configs shipped in pipelines/configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_path(name: str | Path) -> Path:
    """A TOML path, or the name of a shipped config (`synthetic_mini`, `st_resnet_table3`)."""
    path = Path(name)
    if path.suffix != ".toml" and SAFE_NAME.match(str(name)):
        path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise PipelineError(
            f"config {str(name)!r} not found (shipped: {', '.join(shipped_configs())})"
        )
    return path


def build(cls, values: dict, where: str):
    """A dataclass `cls` from a TOML table: unknown keys fail, values type-checked, one line."""
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: expected a table, got {values!r}")
    obj = cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise PipelineError(f"unknown config key {path!r}; known: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if cls is PipelineConfig and key in TABLES:
            value = {
                name_of(n, f"{path}.{n}"): build(TABLES[key], v, f"{path}.{n}")
                for n, v in check_table(value, path).items()
            }
        elif key == "columns":
            value = [build(ColumnSpec, v, f"{path}[{i}]") for i, v in enumerate(value)]
        elif hints[key] is dict:  # strnet overrides or paper numbers: checked elsewhere
            value = check_table(value, path)
        elif hasattr(current, "__dataclass_fields__"):
            value = build(type(current), value, path)
        else:
            try:
                value = check_value(path, value, hints[key])
            except ConfigError as exc:
                raise PipelineError(str(exc)) from None
        setattr(obj, key, value)
    return obj


def check_table(value, path: str) -> dict:
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: expected a table, got {value!r}")
    return value


def name_of(name: str, where: str) -> str:
    """A dataset, phase or column name that becomes a path component: one safe component."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise PipelineError(
            f"{where}: name {name!r} must be letters, digits, '_', '+' or '-' (at most 64)"
        )
    return name


def merge_override(raw: dict, item: str) -> None:
    """Apply one `key=value` override to the raw TOML dict, in place.

    `train.<strnet key>` sets a strnet override of every phase, `phases.<name>.<strnet key>` one
    of that phase (both checked by strnet when the stages are planned); other keys must exist.
    """
    try:
        nested = parse_override(item)
    except ConfigError as exc:
        raise PipelineError(str(exc)) from None
    parts, value = [], nested
    while isinstance(value, dict) and len(value) == 1:
        ((key, value),) = value.items()
        parts.append(key)
    if parts[0] == "train" and len(parts) > 1:
        raw.setdefault("train", {})[".".join(parts[1:])] = value
        return
    if parts[0] == "phases" and len(parts) > 2 and parts[2] not in PHASE_KEYS - {"set"}:
        phase = (raw.get("phases") or {}).get(parts[1])
        if not isinstance(phase, dict):
            known = ", ".join(raw.get("phases") or {})
            raise PipelineError(f"override {item!r}: unknown phase {parts[1]!r}; known: {known}")
        rest = parts[3:] if parts[2] == "set" else parts[2:]
        phase.setdefault("set", {})[".".join(rest)] = value
        return
    target = raw
    for key in parts[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise PipelineError(f"override {item!r}: {key!r} is not a table")
    target[parts[-1]] = value


PHASE_KEYS = {f.name for f in fields(PhaseSpec)}


def flatten_set(value) -> dict:
    """{"model": {"width": 8}} -> {"model.width": 8}: strnet overrides are dotted keys."""
    out: dict = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, inner in v.items():
                walk(f"{prefix}.{k}" if prefix else k, inner)
        else:
            out[prefix] = v

    walk("", value)
    return out


def load_pipeline(name: str | Path, overrides: list[str] | tuple = ()) -> PipelineConfig:
    """Read a shipped or given config, apply `--set` overrides, check it; one-line errors."""
    path = resolve_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: {exc}") from None
    raw = copy.deepcopy(raw)
    for key in ("train",):
        if key in raw:
            raw[key] = flatten_set(raw[key])
    for phase in (raw.get("phases") or {}).values():
        if isinstance(phase, dict) and "set" in phase:
            phase["set"] = flatten_set(phase["set"])
    for item in overrides:
        merge_override(raw, item)
    cfg = build(PipelineConfig, raw, "")
    return validate(cfg, path)


def validate(cfg: PipelineConfig, path: Path) -> PipelineConfig:
    """Checks the types cannot make: kinds, references between phases, columns, splits."""
    where = str(path)
    if not cfg.datasets:
        raise PipelineError(f"{where}: no [datasets]")
    if not cfg.phases:
        raise PipelineError(f"{where}: no [phases]")
    if not cfg.splits or any(s not in (1, 2, 3) for s in cfg.splits):
        raise PipelineError(f"{where}: splits must be a non-empty list of 1, 2, 3")
    for name, ds in cfg.datasets.items():
        if ds.kind not in DATASET_KINDS:
            raise PipelineError(f"datasets.{name}.kind {ds.kind!r}: use {', '.join(DATASET_KINDS)}")
        if len(ds.synth.size) != 2:
            raise PipelineError(f"datasets.{name}.synth.size must be [width, height]")
        if ds.kind == "kinetics" and cfg.splits != [1]:  # train vs validate: one split
            raise PipelineError(
                f"datasets.{name}: a kinetics dataset has one split (train/validate); "
                f"splits must be [1], got {cfg.splits}"
            )
    if cfg.prepare.modality not in MODALITIES:
        raise PipelineError(
            f"prepare.modality {cfg.prepare.modality!r}: use {', '.join(MODALITIES)}"
        )
    names = list(cfg.phases)
    for name, phase in cfg.phases.items():
        if not phase.config:
            raise PipelineError(f"phases.{name}.config is empty (a strnet phase config)")
        for key in ("init", "init_appearance", "init_motion"):
            ref = getattr(phase, key)
            if not ref:
                continue
            ds, _, target = ref.rpartition(":")
            if ds and ds not in cfg.datasets:
                raise PipelineError(f"phases.{name}.{key}: unknown dataset {ds!r} in {ref!r}")
            if target not in names or (not ds and names.index(target) >= names.index(name)):
                raise PipelineError(
                    f"phases.{name}.{key}: {ref!r} is not a phase listed before {name!r}"
                )
    keys = set()
    for i, col in enumerate(cfg.columns):
        name_of(col.key, f"columns[{i}].key")
        if col.key in keys:
            raise PipelineError(f"columns[{i}].key {col.key!r} is used twice")
        keys.add(col.key)
        unknown = [p for p in col.phases if p not in cfg.phases]
        if not col.phases or unknown:
            raise PipelineError(f"columns[{i}] ({col.name}): unknown or no phases {unknown}")
    if not cfg.columns:
        raise PipelineError(f"{where}: no [[columns]]")
    return cfg
