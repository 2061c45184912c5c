"""Training configs as plain dataclasses, loaded from TOML with type-checked `--set` overrides.

One shipped TOML per training phase of Table 2 (`strnet/configs/*.toml`) lists only what differs
from the defaults below; every field has a comment saying what it controls.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PHASES = ("motion", "appearance", "st-resnet", "st-resnet-star")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line."""


@dataclass
class DataConfig:
    """Where clips come from and how they are sampled (Sec. 3.4, Table 2)."""

    root: str = ""  # frame-folder root or shard directory (flowprep reader)
    split: int = 1  # split number N of `train_split<N>.txt` / `test_split<N>.txt`
    train_list: str = ""  # list file; default <root>/train_split<N>.txt
    test_list: str = ""  # list file; default <root>/test_split<N>.txt
    num_chunks: int = 1  # T temporal chunks per clip
    tau_min: int = 1  # smallest temporal stride between chunks (frames)
    tau_max: int = 1  # largest temporal stride between chunks (frames)
    flow_stack: int = 10  # L flows per motion input; unless set, a strnet init checkpoint's L
    use_rgb: bool = True  # load RGB frames (appearance stream)
    use_flow: bool = True  # load flow stacks (motion stream)
    crop: str = "appearance"  # "appearance" (±25 % jitter), "motion" (corner/centre), "none"
    crop_size: int = 224  # side of the network input after crop + resize
    flip_p: float = 0.5  # horizontal-flip probability (flow x negated)
    test_chunks: int = 25  # chunks sampled evenly per test video
    num_workers: int = 2  # DataLoader worker processes


@dataclass
class ModelConfig:
    """Which network to build (`strnet.models.create_model`) and how to initialise it."""

    name: str = "st_resnet50"  # a name of strnet.models.MODEL_NAMES
    num_classes: int = 0  # K output classes; 0 = from the data (1 + largest label of the lists)
    width: int = 0  # conv1 channels, doubled per stage; 0 = init checkpoint's, else 64 (paper)
    in_channels: int = 0  # input channels of a 2D single stream; 0 = from data (3 RGB, 2L flow)
    bn_sub_batch: int = 0  # samples per BatchNorm sub-batch (Table 2 "Bnorm batch"); 0 = whole
    conv1_init: str = "authors"  # conv1 adaptation rule for flow input: "authors" or "timm"
    init: str = ""  # checkpoint to start from: previous phase or local ImageNet weights
    init_appearance: str = ""  # checkpoint of an appearance-stream phase for the RGB stream
    init_motion: str = ""  # checkpoint of a motion-stream phase for the flow stream


@dataclass
class OptimConfig:
    """SGD with momentum and a step learning-rate schedule (Table 2)."""

    batch_size: int = 256  # SGD batch (samples per optimizer step over all ranks)
    micro_batch: int = 32  # samples per forward pass per rank; gradients accumulate up to batch
    lrs: list[float] = field(default_factory=lambda: [1e-2, 1e-3])  # learning rate of each stage
    iterations: list[int] = field(default_factory=lambda: [30000, 10000])  # steps of each stage
    momentum: float = 0.9  # SGD momentum (Sec. 3.4)
    weight_decay: float = 5e-4  # L2 weight decay (MatConvNet default of the authors' code)


@dataclass
class RunConfig:
    """Bookkeeping of one run: seed, device, logging and checkpoint cadence."""

    out: str = "runs/default"  # run folder: config, metrics, checkpoints, curves
    seed: int = 0  # seed of model init and of every augmentation draw
    device: str = "auto"  # "auto", "cpu" or "cuda"
    log_every: int = 10  # steps between metric lines
    ckpt_every: int = 1000  # steps between checkpoints (one more at the end)
    max_steps: int = 0  # stop early after this many steps (0 = full schedule)
    progress: bool = True  # show a tqdm bar on rank 0
    sync_bn: bool = False  # SyncBatchNorm across ranks (off: the paper wants small BN batches)
    precise_bn: int = 0  # micro-batches to re-estimate BN statistics on at the end (0 = off)
    val_every: int = 0  # steps between top-1 checks on the test list (centre crops); 0 = off


@dataclass
class TrainConfig:
    """Everything one training run needs; saved resolved in the run folder and each checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # dotted keys the TOML file or overrides set (by `load_config`; None: built in Python)
    explicit_keys: typing.ClassVar[frozenset[str] | None] = None

    def validate(self) -> TrainConfig:
        """Check values the types cannot; raise ConfigError with one line on the first problem."""
        o, d = self.optim, self.data
        checks = [
            (
                len(o.lrs) == len(o.iterations) > 0,
                "optim.lrs and optim.iterations need equal length",
            ),
            (all(lr > 0 for lr in o.lrs), "optim.lrs must be positive"),
            (all(n > 0 for n in o.iterations), "optim.iterations must be positive"),
            (o.batch_size > 0 and o.micro_batch > 0, "optim batch sizes must be positive"),
            (
                o.batch_size % o.micro_batch == 0,
                "optim.batch_size must be a multiple of micro_batch",
            ),
            (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)"),
            (1 <= d.tau_min <= d.tau_max, "data.tau_min/tau_max need 1 <= tau_min <= tau_max"),
            (
                d.num_chunks >= 1 and d.flow_stack >= 1,
                "data.num_chunks and flow_stack must be >= 1",
            ),
            (d.use_rgb or d.use_flow, "data.use_rgb and data.use_flow cannot both be false"),
            (d.crop in ("appearance", "motion", "center", "none"), f"bad data.crop {d.crop!r}"),
            (0.0 <= d.flip_p <= 1.0, "data.flip_p must be in [0, 1]"),
            (d.crop_size > 0 and d.test_chunks > 0, "data.crop_size and test_chunks must be > 0"),
            (self.model.num_classes >= 0, "model.num_classes must be >= 0 (0 = from the data)"),
            (self.model.width >= 0, "model.width must be >= 0 (0 = from init or 64)"),
            (self.run.val_every >= 0, "run.val_every must be >= 0 (0 = off)"),
            (
                self.run.log_every > 0 and self.run.ckpt_every > 0,
                "run.log_every and run.ckpt_every must be positive",
            ),
            (self.run.precise_bn >= 0, "run.precise_bn must be >= 0"),
            (self.model.bn_sub_batch >= 0, "model.bn_sub_batch must be >= 0 (0 = whole batch)"),
            (
                self.model.conv1_init in ("authors", "timm"),
                "model.conv1_init must be authors or timm",
            ),
            (self.run.device in ("auto", "cpu", "cuda"), "run.device must be auto, cpu or cuda"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def check_value(key: str, value, tp):
    """Return `value` as type `tp` (int -> float allowed) or raise ConfigError naming the key.

    Supports the field types used here: bool, int, float, str, list[...] and X | None.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            try:
                return check_value(key, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool or tp is int:
        if type(value) is not tp:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def apply_dict(cfg, values: dict, prefix: str = "", seen: set[str] | None = None) -> None:
    """Set nested `values` onto dataclass `cfg` in place, type-checked; unknown keys fail.

    The dotted keys set are added to `seen` (when given), so callers know what the user chose.
    """
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; known: {', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a table of settings, got {value!r}")
            apply_dict(current, value, prefix=f"{path}.", seen=seen)
        else:
            setattr(cfg, key, check_value(path, value, hints[key]))
            if seen is not None:
                seen.add(path)


def parse_override(item: str) -> dict:
    """Turn `a.b=value` into {"a": {"b": value}}; value parsed as TOML, else taken as a string.

    So `optim.lrs=[0.1,0.01]`, `run.seed=3` and `data.root=/data/ucf` all work.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A TOML path, or the name of a shipped phase config (`motion`, `st-resnet`, ...)."""
    path = Path(name)
    if path.suffix != ".toml" and str(name) in PHASES:
        path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"config {str(name)!r} not found (shipped: {', '.join(PHASES)})")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """Defaults, then the TOML file (if any), then `key=value` overrides; validated.

    Raises ConfigError with a one-line message for unknown keys or ill-typed values. The keys
    the file or the overrides set are kept in `cfg.explicit_keys` (see `is_set`).
    """
    cfg, seen = TrainConfig(), set()
    if path is not None:
        p = resolve_config_path(path)
        try:
            values = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        apply_dict(cfg, values, seen=seen)
    for item in overrides:
        apply_dict(cfg, parse_override(item), seen=seen)
    cfg.explicit_keys = frozenset(seen)
    return cfg.validate()


def is_set(cfg: TrainConfig, key: str) -> bool:
    """Whether the dotted `key` was chosen by the user rather than left at its default.

    For a config from `load_config`: set by the TOML file or an override. For one built in
    Python: its value differs from the default. Settings inherited from an init checkpoint
    (e.g. `data.flow_stack`) are inherited only when not set.
    """
    if cfg.explicit_keys is not None:
        return key in cfg.explicit_keys
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name) != getattr(getattr(TrainConfig(), section), name)


RUN_INFO_KEYS = ("classes",)  # written beside the config in a run's config.json, not settings


def config_from_dict(values: dict) -> TrainConfig:
    """Rebuild a TrainConfig from `dataclasses.asdict` output (a checkpoint's or config.json).

    Run information stored beside the settings (`classes`) is ignored.
    """
    cfg = TrainConfig()
    apply_dict(cfg, {k: v for k, v in values.items() if k not in RUN_INFO_KEYS})
    return cfg.validate()


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as plain nested dicts (TOML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)
