"""Training configs as plain dataclasses, loaded from TOML with type-checked `--set` overrides.

One shipped TOML per training phase of Table 2 (`strnet/configs/*.toml`) lists only what differs
from the defaults below; every field has a comment saying what it controls.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")  # run.device and every --device
DEVICES = "auto, cpu, cuda or cuda:N"
LOSSES = ("softmax", "hinge")  # optim.loss
PHASES = ("motion", "appearance", "st-resnet", "st-resnet-star")
PHASES += ("resnet3d18-kinetics", "resnet3d34-kinetics")  # Hara et al. 2017, Sec. 3.2
PHASES += ("fusion", "fusion-3d")  # Two-Stream Fusion (CVPR 2016): Table 1, Sec. 3.4
# training crop rules: Sec. 3.4 of ST-ResNet ("appearance", "motion"), Hara Sec. 3.2 ("multiscale")
DATA_CROPS = ("appearance", "motion", "center", "none", "multiscale")


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
    flow_offset: int | str = "center"  # first flow of a stack vs its frame: "center" (-L/2) or int
    use_rgb: bool = True  # load RGB frames (appearance stream)
    use_flow: bool = True  # load flow stacks (motion stream)
    crop: str = "appearance"  # "appearance" (±25 % jitter), "motion" (corner/centre), "none",
    # "multiscale" (3D ResNets: square corner/centre crops at 5 scales of the short side)
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
    residual_input: str = "pre_relu"  # eq. 2's x_a: "pre_relu" (authors') or "post_relu" (old)
    stride_in_1x1: bool = False  # ResNet v1 (stride on 1x1, Table 1); False: v1.5 (torchvision)
    # dropout before fc of a ResNet stream (two-stream models: the motion stream's). The paper:
    # none; the authors' code: 0.8 for the motion stream and STM-ResNet (docs/strnet.md)
    head_dropout: float = 0.0
    # Two-Stream Fusion (fusion_* models, strnet.fusion): how, where, which towers
    fusion: str = "sum"  # sum, max, concat, conv, bilinear (Sec. 3.1) or conv3d (Sec. 3.3)
    fuse_at: str = "softmax"  # layer the towers are fused after ("relu5", "relu4", ...) or softmax
    truncate: bool = False  # drop the motion tower after the fusion (Fig. 2 left); else keep it
    pool3d: bool = False  # pool5 as a 3D max pool over 5 chunks (Sec. 3.3); always with conv3d
    freeze_towers: bool = False  # train only from the fusion on (Sec. 3.5); needs trained towers
    dropout: float = 0.85  # fusion_vgg*: dropout ratio of fc6 and fc7 (Sec. 3.5)
    motion_net: str = ""  # fusion_vgg*: the motion tower's VGG ("" = same; vggm2048: Table 4)
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
    # softmax: cross-entropy (the papers' networks); hinge: the multi-class SVM hinge of Weston and
    # Watkins, margin 1 (torch's multi_margin_loss), with weight decay as its L2 term: on frozen
    # towers' bilinear features this trains Table 1's linear SVM by SGD
    loss: str = "softmax"


@dataclass
class RunConfig:
    """Bookkeeping of one run: seed, device, logging and checkpoint cadence."""

    out: str = "runs/default"  # run folder: config, metrics, checkpoints, curves
    seed: int = 0  # seed of model init and of every augmentation draw
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N" (GPU N)
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
        """Check values the types cannot; raise ConfigError with one line on the first problem.

        Every count, period and size a loop steps by or divides by is checked here, where the
        config is read, with a line naming the key and its value (`run.log_every must be >= 1,
        got 0`), so no bad value reaches the trainer as a traceback.
        """
        o, d, m, r = self.optim, self.data, self.model, self.run
        at_least = [  # (key, value, smallest allowed, what 0 means when allowed)
            ("optim.batch_size", o.batch_size, 1, ""),
            ("optim.micro_batch", o.micro_batch, 1, ""),
            ("data.split", d.split, 1, ""),
            ("data.num_chunks", d.num_chunks, 1, ""),
            ("data.flow_stack", d.flow_stack, 1, ""),
            ("data.crop_size", d.crop_size, 1, ""),
            ("data.test_chunks", d.test_chunks, 1, ""),
            ("data.num_workers", d.num_workers, 0, ""),
            ("model.num_classes", m.num_classes, 0, "from the data"),
            ("model.width", m.width, 0, "from init or 64"),
            ("model.in_channels", m.in_channels, 0, "from the data"),
            ("model.bn_sub_batch", m.bn_sub_batch, 0, "whole batch"),
            ("run.seed", r.seed, 0, ""),
            ("run.log_every", r.log_every, 1, ""),
            ("run.ckpt_every", r.ckpt_every, 1, ""),
            ("run.max_steps", r.max_steps, 0, "full schedule"),
            ("run.precise_bn", r.precise_bn, 0, "off"),
            ("run.val_every", r.val_every, 0, "off"),
        ]
        for key, value, low, zero in at_least:
            if value < low:
                note = f" (0 = {zero})" if zero else ""
                raise ConfigError(f"{key} must be >= {low}{note}, got {value}")
        for i, lr in enumerate(o.lrs):
            if not (math.isfinite(lr) and lr > 0):
                raise ConfigError(f"optim.lrs[{i}] must be a finite number > 0, got {lr}")
        for i, n in enumerate(o.iterations):
            if n < 1:
                raise ConfigError(f"optim.iterations[{i}] must be >= 1, got {n}")
        checks = [
            (
                len(o.lrs) == len(o.iterations) > 0,
                "optim.lrs and optim.iterations need equal length",
            ),
            (
                o.batch_size % o.micro_batch == 0,
                "optim.batch_size must be a multiple of micro_batch",
            ),
            (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)"),
            (o.loss in LOSSES, f"optim.loss must be one of {', '.join(LOSSES)}, got {o.loss!r}"),
            (
                0 <= m.head_dropout < 1,
                f"model.head_dropout must be in [0, 1), got {m.head_dropout}",
            ),
            (
                math.isfinite(o.weight_decay) and o.weight_decay >= 0,
                f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}",
            ),
            (1 <= d.tau_min <= d.tau_max, "data.tau_min/tau_max need 1 <= tau_min <= tau_max"),
            (d.use_rgb or d.use_flow, "data.use_rgb and data.use_flow cannot both be false"),
            (d.crop in DATA_CROPS, f"bad data.crop {d.crop!r}"),
            (0.0 <= d.flip_p <= 1.0, "data.flip_p must be in [0, 1]"),
            (
                m.conv1_init in ("authors", "timm"),
                "model.conv1_init must be authors or timm",
            ),
            (DEVICE_NAME.fullmatch(str(r.device)) is not None, "run.device must be " + DEVICES),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_architecture_keys(self)
        return self


def check_architecture_keys(cfg: TrainConfig) -> None:
    """model.residual_input and data.flow_offset (issue 14); ConfigError with one line."""
    if cfg.model.residual_input not in ("pre_relu", "post_relu"):
        raise ConfigError(
            f"model.residual_input must be pre_relu or post_relu, got {cfg.model.residual_input!r}"
        )
    offset = cfg.data.flow_offset
    if isinstance(offset, str) and offset != "center":
        raise ConfigError(f"data.flow_offset must be 'center' or an integer, got {offset!r}")
    m = cfg.model
    pool3d = m.name.startswith("fusion_") and (m.fusion == "conv3d" or m.pool3d)  # Sec. 3.3
    if m.name.endswith("_star") or pool3d:  # max over 5 chunks, stride 2, no padding
        for key in ("num_chunks", "test_chunks"):
            t = getattr(cfg.data, key)
            if t > 5 and (t - 5) % 2:
                raise ConfigError(
                    f"data.{key} = {t} leaves the last chunk out of {m.name}'s max-pooling "
                    f"(windows of 5, stride 2); use {t - 1} or {t + 1}"
                )


# What a config saved before a key existed meant: a checkpoint of an older strnet rebuilds the
# network and the sampling it was trained with (post-ReLU eq. 2 input, stacks from the frame on).
LEGACY_DEFAULTS = {"model": {"residual_input": "post_relu"}, "data": {"flow_offset": 0}}


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
    values = {k: v for k, v in values.items() if k not in RUN_INFO_KEYS}
    for section, legacy in LEGACY_DEFAULTS.items():
        if isinstance(values.get(section), dict):
            values[section] = {**legacy, **values[section]}
    apply_dict(cfg, values)
    return cfg.validate()


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as plain nested dicts (TOML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)
