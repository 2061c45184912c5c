"""What training, validation and evaluation share: device, data access, models, scoring, fusion.

The trainer is a leaf that nobody imports; `strnet.evaluate` and `strnet.train` both take these
from here. Scores are per stream and before softmax; `fused_scores` and `VideoScores.fused`
average streams with the one fusion, `strnet.st_resnet.fuse`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from flowprep.layout import list_name
from strnet.checkpoint import CheckpointError, load_checkpoint
from strnet.clips3d import Clip3dConfig, Clip3dDataset, window_log_probs
from strnet.config import DEVICE_NAME, DEVICES, ConfigError, TrainConfig, config_from_dict, is_set
from strnet.data import ClipDataset, SamplingConfig, hflip_normalized_flow, read_split_list
from strnet.fusion import FUSION_ARGS
from strnet.models import MODEL_NAMES, create_model, is_3d, is_two_stream, model_arguments
from strnet.st_resnet import fuse
from strnet.weights import strip_prefixes

PROTOCOLS = ("paper", "center")


# --------------------------------------------------------------------------- device / DDP
@dataclass
class Context:
    """Where this process runs: device, rank and world size (torchrun env vars)."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(RuntimeError):
    """The device asked for is not there (`cuda` without a GPU, `cuda:3` on a 2-GPU machine).

    The CLI reports it as a usage error: one line `Error: ...`, exit status 2.
    """


def setup_device(preference: str = "auto") -> Context:
    """Pick the device and join the process group when torchrun started us.

    `cuda` is GPU LOCAL_RANK (0 without torchrun), `cuda:N` GPU N. Backend is nccl on CUDA and
    gloo on CPU; without WORLD_SIZE > 1 no group is created. Raises DeviceError when a GPU is
    asked for that this process does not have.
    """
    if not DEVICE_NAME.fullmatch(str(preference)):
        raise ConfigError(f"device must be {DEVICES}, got {preference!r}")
    kind, _, index = preference.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {preference!r} asked for but no GPU is available (torch.cuda.is_available() "
            "is False): use device cpu or auto"
        )
    use_cuda = kind == "cuda" or (preference == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    gpu = int(index) if index else local
    if use_cuda and gpu >= torch.cuda.device_count():
        have = f"this machine has {torch.cuda.device_count()} GPU(s)"
        if index:
            raise DeviceError(f"device {preference!r} asked for but {have}")
        raise DeviceError(f"LOCAL_RANK is {local} but {have}: start at most one process per GPU")
    device = torch.device("cuda", gpu) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(device, rank, local, world)


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; on the CPU full precision (a no-op context)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- data
def sampling_config(cfg: TrainConfig) -> SamplingConfig:
    """The dataset-side view of the [data] section."""
    d = cfg.data
    return SamplingConfig(
        num_chunks=d.num_chunks,
        tau_min=d.tau_min,
        tau_max=d.tau_max,
        flow_stack=d.flow_stack,
        flow_offset=d.flow_offset,
        use_rgb=d.use_rgb,
        use_flow=d.use_flow,
        crop=d.crop,
        crop_size=d.crop_size,
        flip_p=d.flip_p,
        test_chunks=d.test_chunks,
    )


def list_path(cfg: TrainConfig, subset: str) -> Path:
    """The train or test list file of `cfg.data.split` (`data.<subset>_list` if given)."""
    given = cfg.data.train_list if subset == "train" else cfg.data.test_list
    return Path(given) if given else Path(cfg.data.root) / list_name(subset, cfg.data.split)


def split_items(cfg: TrainConfig, subset: str) -> list[tuple[str, int]]:
    """(video_id, label) pairs of the train or test list of `cfg.data.split`.

    A line that does not parse or holds a negative label is a one-line ConfigError naming the
    list file and the line (`train_split1.txt:7: ...`).
    """
    path = list_path(cfg, subset)
    if not path.is_file():
        raise ConfigError(f"{subset} list {str(path)!r} not found (set data.{subset}_list)")
    try:
        items = read_split_list(path)
    except UnicodeDecodeError:
        raise ConfigError(f"{subset} list '{path}' is not a text file") from None
    except ValueError as exc:
        raise ConfigError(bad_label_line(path) or str(exc)) from None
    for vid, label in items:
        if label < 0:
            raise ConfigError(f"{list_line(path, vid)}: label {label} of {vid!r} is negative")
    return items


def list_line(path: Path, vid: str) -> str:
    """`<path>:<n>`, the line of a list file that names `vid` (for error messages)."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if parts and parts[0] == vid:
            return f"{path}:{n}"
    return str(path)


def bad_label_line(path: Path) -> str | None:
    """The message for a list line whose label is not an integer; None when every one is."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) == 3:
            try:
                int(parts[2])
            except ValueError:
                return f"{path}:{n}: label {parts[2]!r} of {parts[0]!r} is not an integer"
    return None


def open_data(root: str):
    """Open a frame-folder root or shard directory through flowprep's reader API."""
    from flowprep.reader import open_reader

    if not root or not Path(root).exists():
        raise ConfigError(f"data root {root!r} not found (set data.root)")
    return open_reader(root)


def test_loader(
    cfg: TrainConfig, reader, items: list[tuple[str, int]], *, protocol: str, num_workers: int,
    persistent: bool = False,
) -> DataLoader:  # fmt: skip
    """One test video per item: `data.test_chunks` even chunks, whole frames or a centre crop.

    The loader has its own generator, so iterating it leaves the global RNG (and an exact
    resume) alone; `persistent` keeps its workers between passes (validation during training).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    if is_3d(cfg.model.name):  # 3D ResNets: every 16-frame window (paper) or the middle one
        windows = "all" if protocol == "paper" else "center"
        dataset = Clip3dDataset(reader, items, clip3d_config(cfg, windows), train=False)
    else:
        sampling = replace(sampling_config(cfg), crop="none" if protocol == "paper" else "center")
        dataset = ClipDataset(reader, items, sampling, train=False)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator(),
    )


# --- 3D ResNets (Hara et al. 2017): their clips and training dataset (strnet.clips3d) ---
def clip3d_config(cfg: TrainConfig, windows: str = "all") -> Clip3dConfig:
    """The 3D-clip view of the [data] section (crop rule, crop size, flip); `windows` at test."""
    d = cfg.data
    return Clip3dConfig(crop_size=d.crop_size, crop=d.crop, flip_p=d.flip_p, windows=windows)


def train_dataset(cfg: TrainConfig, reader) -> ClipDataset | Clip3dDataset:
    """The training dataset of the run: 3D clips for a 3D ResNet, else `ClipDataset` chunks."""
    items = split_items(cfg, "train")
    if is_3d(cfg.model.name):
        return Clip3dDataset(reader, items, clip3d_config(cfg), train=True, seed=cfg.run.seed)
    return ClipDataset(reader, items, sampling_config(cfg), train=True, seed=cfg.run.seed)


# --- end of the 3D ResNet data path ---


# --------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """Create the network of the [model] section through `strnet.models.create_model`.

    `model.num_classes` must be known (resolved from the data); width 0 means the paper's 64.
    """
    m, d = cfg.model, cfg.data
    if m.name not in MODEL_NAMES:
        raise ConfigError(f"unknown model.name {m.name!r}; known: {', '.join(MODEL_NAMES)}")
    if m.num_classes <= 0:
        raise ConfigError("model.num_classes is 0: resolve it from the data first")
    if is_set(cfg, "model.head_dropout") and "head_dropout" not in model_arguments(m.name):
        raise ConfigError(f"model.head_dropout is a setting of the ResNet streams, not {m.name}")
    if is_3d(m.name):  # a 3D ResNet reads RGB clips only
        if d.use_flow or not d.use_rgb:
            raise ConfigError(
                f"{m.name} reads RGB clips: set data.use_rgb=true, data.use_flow=false"
            )
        kw3d = dict(num_classes=m.num_classes, width=m.width or 64, in_channels=m.in_channels or 3)
        return create_model(m.name, **kw3d)
    kw = dict(num_classes=m.num_classes, width=m.width or 64, bn_sub_batch=m.bn_sub_batch or None)
    kw.update(stride_in_1x1=m.stride_in_1x1, head_dropout=m.head_dropout)
    if "residual_input" in model_arguments(m.name):  # ST-/STM-ResNet: eq. 2's x_a
        kw.update(residual_input=m.residual_input)
    kw.update(fusion_kwargs(cfg))
    if is_two_stream(m.name):
        if not (d.use_rgb and d.use_flow):
            raise ConfigError(f"{m.name} needs data.use_rgb and data.use_flow")
        kw.update(flow_stack=d.flow_stack)
    else:
        if d.use_rgb == d.use_flow:
            raise ConfigError("a single-stream model needs data.use_rgb or data.use_flow, not both")
        kw.update(in_channels=m.in_channels or (3 if d.use_rgb else 2 * d.flow_stack))
    return create_model(m.name, **{k: v for k, v in kw.items() if k in model_arguments(m.name)})


FUSION_FIELDS = (*FUSION_ARGS, "dropout", "motion_net")  # model.* of the fusion_* models only


def fusion_kwargs(cfg: TrainConfig) -> dict:
    """The Two-Stream Fusion settings a fusion_* model takes (`strnet.fusion.fusion_net`); one
    of them set for another model is a one-line ConfigError."""
    m, known = cfg.model, model_arguments(cfg.model.name)
    for key in FUSION_FIELDS:
        if key not in known and is_set(cfg, f"model.{key}"):
            raise ConfigError(f"model.{key} is a setting of the fusion_* models, not {m.name}")
    if "fusion" in known and m.freeze_towers and not (m.init or m.init_appearance or m.init_motion):
        raise ConfigError(
            "model.freeze_towers trains only the layers from the fusion on: start from trained "
            "towers (model.init_appearance, model.init_motion) or set it false"
        )
    kw = dict(fusion=m.fusion, fuse_at=m.fuse_at, truncate=m.truncate, pool3d=m.pool3d or None)
    kw.update(freeze_towers=m.freeze_towers, dropout=m.dropout, motion_net=m.motion_net or None)
    return kw


@dataclass
class Trained:
    """A model rebuilt from a training checkpoint, with its config and class names."""

    cfg: TrainConfig
    model: torch.nn.Module
    classes: list[str] | None  # None for checkpoints older than `ckpt["classes"]`
    path: Path


def load_trained(path: str | Path) -> Trained:
    """Rebuild the model of a strnet training checkpoint (on the CPU) with its weights."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a strnet training checkpoint")
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    classes = [str(c) for c in ckpt["classes"]] if ckpt.get("classes") else None
    return Trained(cfg, model, classes, Path(path))


def forward_scores(model, batch: dict, two_stream: bool, device) -> dict[str, torch.Tensor]:
    """Per-stream class scores (B, T', K) of a batch of clips.

    A single 2D stream classifies every chunk of (B, T, C, H, W) on its own; a 3D ResNet's
    clips (B, 3, T, H, W) give one position each, (B, 1, K).
    """
    if "clip" in batch:  # 3D ResNet training clips (strnet.clips3d)
        return {"appearance": model(batch["clip"].to(device, non_blocking=True))[:, None]}
    if two_stream:
        rgb = batch["rgb"].to(device, non_blocking=True)
        flow = batch["flow"].to(device, non_blocking=True)
        return model(rgb, flow)
    key, stream = ("flow", "motion") if "flow" in batch else ("rgb", "appearance")
    return {stream: model(batch[key].to(device, non_blocking=True))}


def fused_scores(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Video scores (B, K): average over positions, then over streams (`fuse`), before softmax."""
    return fuse({k: s.float().mean(1) for k, s in scores.items()})


# --------------------------------------------------------------------------- scoring
def video_views(sample: dict, flips: bool) -> dict:
    """Batch of views (V, T, C, H, W) of one test clip: itself and, with `flips`, its mirror."""
    views: dict = {}
    if "rgb" in sample:
        rgb = sample["rgb"]
        views["rgb"] = torch.stack([rgb, torch.flip(rgb, dims=[-1])]) if flips else rgb[None]
    if "flow" in sample:
        flow = sample["flow"]
        views["flow"] = torch.stack([flow, hflip_normalized_flow(flow)]) if flips else flow[None]
    return views


@torch.no_grad()
def video_scores(model, views: dict, two_stream: bool, device, autocast) -> dict:
    """Per-stream (K,) scores of one video: mean over views and positions, no softmax."""
    with autocast:
        scores = forward_scores(model, views, two_stream, device)
    return {k: v.float().mean(dim=(0, 1)).cpu() for k, v in scores.items()}


def score_videos(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    two_stream: bool,
    device,
    flips: bool,
    on_video: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per-stream (N, K) float32 scores of every video of a `test_loader`, model in eval mode.

    The caller's train/eval mode is restored afterwards (validation runs inside training).
    `on_video()` is called after each video is scored (a progress bar).
    """
    was_training = model.training
    model.eval()
    autocast = autocast_for(torch.device(device))
    per_stream: dict[str, list] = {}
    try:
        for sample in loader if on_video is None else _then(loader, on_video):
            if "clips" in sample:  # a 3D ResNet: window probabilities averaged (Hara Sec. 3.2.2)
                scores = window_log_probs(model, sample["clips"], device, autocast)
                per_stream.setdefault("appearance", []).append(scores.numpy())
                continue
            views = video_views(sample, flips=flips)
            for stream, s in video_scores(model, views, two_stream, device, autocast).items():
                per_stream.setdefault(stream, []).append(s.numpy())
    finally:
        model.train(was_training)
    return {k: np.stack(v).astype(np.float32) for k, v in per_stream.items()}


def _then(items, done: Callable[[], None]):
    """Yield each item, calling `done()` once the consumer has finished with it."""
    for item in items:
        yield item
        done()


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of (N, K) `scores` whose label is among the k highest."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())
