"""What training, validation and evaluation share: device, data access, models, scoring, fusion.

The trainer is a leaf that nobody imports; `strnet.evaluate` and `strnet.train` both take these
from here. Scores are per stream and before softmax; `fused_scores` and `VideoScores.fused`
average streams with the one fusion, `strnet.st_resnet.fuse`.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from strnet.checkpoint import CheckpointError, load_checkpoint
from strnet.config import ConfigError, TrainConfig, config_from_dict
from strnet.data import ClipDataset, SamplingConfig, hflip_normalized_flow, read_split_list
from strnet.models import MODEL_NAMES, create_model, is_two_stream, model_arguments
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


class DeviceError(click.ClickException):
    """The device asked for is not there (`cuda` without a GPU): a usage error, exit status 2.

    A click exception rather than a ConfigError, so `strnet train`, `eval` and `predict` all end
    with the one line `Error: ...` and status 2 without a traceback.
    """

    exit_code = 2


def setup_device(preference: str = "auto") -> Context:
    """Pick the device and join the process group when torchrun started us.

    Backend is nccl on CUDA and gloo on CPU; without WORLD_SIZE > 1 no group is created.
    Raises DeviceError when `cuda` is asked for and this process has no GPU to use.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "device 'cuda' asked for but no GPU is available (torch.cuda.is_available() is "
            "False): use device cpu or auto"
        )
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local >= torch.cuda.device_count():
        raise DeviceError(
            f"LOCAL_RANK is {local} but this machine has {torch.cuda.device_count()} GPU(s): "
            "start at most one process per GPU"
        )
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
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
    return Path(given) if given else Path(cfg.data.root) / f"{subset}_split{cfg.data.split}.txt"


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
    sampling = replace(sampling_config(cfg), crop="none" if protocol == "paper" else "center")
    dataset = ClipDataset(reader, items, sampling, train=False)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator(),
    )


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
    kw = dict(num_classes=m.num_classes, width=m.width or 64, bn_sub_batch=m.bn_sub_batch or None)
    kw.update(stride_in_1x1=m.stride_in_1x1)
    if "residual_input" in model_arguments(m.name):  # ST-/STM-ResNet: eq. 2's x_a
        kw.update(residual_input=m.residual_input)
    if is_two_stream(m.name):
        if not (d.use_rgb and d.use_flow):
            raise ConfigError(f"{m.name} needs data.use_rgb and data.use_flow")
        kw.update(flow_stack=d.flow_stack)
    else:
        if d.use_rgb == d.use_flow:
            raise ConfigError("a single-stream model needs data.use_rgb or data.use_flow, not both")
        kw.update(in_channels=m.in_channels or (3 if d.use_rgb else 2 * d.flow_stack))
    return create_model(m.name, **kw)


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

    A single 2D stream classifies every chunk of (B, T, C, H, W) on its own.
    """
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
    model: torch.nn.Module, loader: DataLoader, *, two_stream: bool, device, flips: bool
) -> dict[str, np.ndarray]:
    """Per-stream (N, K) float32 scores of every video of a `test_loader`, model in eval mode.

    The caller's train/eval mode is restored afterwards (validation runs inside training).
    """
    was_training = model.training
    model.eval()
    autocast = autocast_for(torch.device(device))
    per_stream: dict[str, list] = {}
    try:
        for sample in loader:
            views = video_views(sample, flips=flips)
            for stream, s in video_scores(model, views, two_stream, device, autocast).items():
                per_stream.setdefault(stream, []).append(s.numpy())
    finally:
        model.train(was_training)
    return {k: np.stack(v).astype(np.float32) for k, v in per_stream.items()}


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of (N, K) `scores` whose label is among the k highest."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())
