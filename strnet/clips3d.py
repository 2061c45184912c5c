"""Training samples and sliding-window recognition of 3D ResNets (Hara et al. 2017, Sec. 3.2).

Training (Sec. 3.2.1): one 16-frame clip per video at a uniformly drawn start (videos shorter
than 16 frames are looped), a square crop at one of the 4 corners or the centre whose side is
the short side times a scale drawn from {1, 2^-1/4, 2^-1/2, 2^-3/4, 1/2}, resized to 112 x 112,
flipped horizontally with probability 1/2, minus the mean RGB.
Recognition (Sec. 3.2.2): the video split into non-overlapping 16-frame windows (the last one,
if short, looped like a short video), each cropped at the centre at the maximum scale (the short
side) and resized to 112; class probabilities of the windows averaged.

The mean is the Kinetics mean RGB of the authors' code (kenshohara/3D-ResNets-PyTorch,
`mean.py`, `get_mean(norm_value=1, dataset="kinetics")`) on the 0-255 scale; pixels are not
divided by a standard deviation (the default of that code). Frames come through flowprep's
reader (frame folders or HDF5 shards) exactly as for the 2D models (`strnet.data`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from strnet.data import CropBox, check_in_reader, crop_resize, hflip_rgb, read_frames
from strnet.resnet3d import CLIP_FRAMES, CLIP_SIZE, loop_frames

KINETICS_MEAN = np.array([110.63666788, 103.16065604, 96.29023126], dtype=np.float32)  # 0-255
MULTISCALE_SCALES = (1.0, 2**-0.25, 2**-0.5, 2**-0.75, 0.5)  # of the short side, Sec. 3.2.1
CROPS_3D = ("multiscale", "center")  # training crop rules of a 3D clip
WINDOWS_3D = ("all", "center")  # test windows: all non-overlapping ones, or the middle one


@dataclass
class Clip3dConfig:
    """What one 3D sample holds (Sec. 3.2)."""

    clip_frames: int = CLIP_FRAMES  # frames per clip (16)
    crop_size: int = CLIP_SIZE  # output side after crop + resize (112)
    crop: str = "multiscale"  # training crop: "multiscale" (corners + centre, 5 scales) or "center"
    flip_p: float = 0.5  # probability of a horizontal flip (training)
    windows: str = "all"  # test windows: "all" (sliding, non-overlapping) or "center" (one)


# --------------------------------------------------------------------------- temporal sampling
def train_clip_frames(num_frames: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` consecutive frames starting at a uniformly drawn frame, looped when the video is
    shorter than `length` (Sec. 3.2.1)."""
    start = int(rng.integers(0, max(num_frames - length, 0) + 1))
    frames = list(range(start, min(start + length, num_frames)))
    return np.array([frames[i] for i in loop_frames(len(frames), length)], dtype=np.int64)


def window_starts(num_frames: int, length: int, windows: str = "all") -> list[int]:
    """First frames of the test windows: 0, length, 2 length, ... ("all"), or the middle one."""
    if windows == "center":
        return [max(num_frames - length, 0) // 2]
    if windows != "all":
        raise ValueError(f"unknown test windows {windows!r}; use {' or '.join(WINDOWS_3D)}")
    return list(range(0, max(num_frames, 1), length))


def window_frames(num_frames: int, length: int, windows: str = "all") -> np.ndarray:
    """(W, length) frame indices of the non-overlapping test windows (Sec. 3.2.2).

    A window that runs past the end (or a video shorter than one window) is looped over its
    own frames, as a short training video is.
    """
    out = []
    for start in window_starts(num_frames, length, windows):
        frames = list(range(start, min(start + length, num_frames)))
        out.append([frames[i] for i in loop_frames(len(frames), length)])
    return np.array(out, dtype=np.int64)


# --------------------------------------------------------------------------- spatial crops
def corner_crop_box(
    height: int, width: int, rng: np.random.Generator, scales: Sequence[float] = MULTISCALE_SCALES
) -> CropBox:
    """A square crop of side round(short side x scale) at one of the 4 corners or the centre;
    scale and position drawn uniformly (Sec. 3.2.1, as Wang et al.'s multi-scale cropping)."""
    side = max(1, round(min(height, width) * float(rng.choice(scales))))
    k = int(rng.integers(0, 5))
    ys = (0, 0, height - side, height - side, (height - side) // 2)
    xs = (0, width - side, 0, width - side, (width - side) // 2)
    return CropBox(ys[k], xs[k], side, side)


def center_square_box(height: int, width: int) -> CropBox:
    """The centred square at the maximum scale (side = the short side), Sec. 3.2.2."""
    side = min(height, width)
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def normalize_clip(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) minus the Kinetics mean RGB (0-255 scale)."""
    x = frames.astype(np.float32) - KINETICS_MEAN
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2)))


# --------------------------------------------------------------------------- dataset
class Clip3dDataset(Dataset):
    """3D clips of a flowprep reader: training samples or a video's test windows.

    Items are dicts: training `clip` (3, T, S, S) float, test `clips` (W, 3, T, S, S) (every
    window of the video), plus `label` and `index`. Keys and seeding follow `ClipDataset`: an
    item is asked for by `index` or `(epoch, index)`, and its draws come from a generator
    seeded by (seed, epoch, index), so a resumed run draws the same samples.
    """

    def __init__(
        self,
        reader,
        items: Sequence[tuple[str, int]],
        cfg: Clip3dConfig,
        *,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        check_in_reader(reader, items)
        if cfg.crop not in CROPS_3D:
            raise ValueError(f"3D clips need data.crop {' or '.join(CROPS_3D)}, got {cfg.crop!r}")
        window_starts(1, 1, cfg.windows)  # a bad value fails here, not in a worker
        self.reader, self.items, self.cfg = reader, list(items), cfg
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws `__getitem__` makes (exact resume)."""
        self.epoch = epoch

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        cfg, rng = self.cfg, self.rng(index, epoch)
        vid, label = self.items[index]
        video = self.reader[vid]
        out: dict = {"label": int(label), "index": int(index)}
        if self.train:
            frames = read_frames(
                video.rgb, train_clip_frames(video.num_frames, cfg.clip_frames, rng)
            )
            h, w = frames.shape[1:3]
            crop = corner_crop_box(h, w, rng) if cfg.crop == "multiscale" else None
            frames = crop_resize(frames, crop or center_square_box(h, w), cfg.crop_size)
            if rng.random() < cfg.flip_p:
                frames = hflip_rgb(frames)
            out["clip"] = normalize_clip(frames)
            return out
        windows = window_frames(video.num_frames, cfg.clip_frames, cfg.windows)
        frames = read_frames(video.rgb, windows.reshape(-1))
        frames = crop_resize(frames, center_square_box(*frames.shape[1:3]), cfg.crop_size)
        frames = frames.reshape(len(windows), cfg.clip_frames, *frames.shape[1:])
        out["clips"] = torch.stack([normalize_clip(f) for f in frames])
        return out


# --------------------------------------------------------------------------- recognition
@torch.no_grad()
def window_log_probs(
    model: torch.nn.Module, clips: torch.Tensor, device, autocast, batch: int = 32
) -> torch.Tensor:
    """(K,) log of the class probabilities averaged over a video's windows (Sec. 3.2.2).

    `clips` is (W, 3, T, S, S); windows go through the model `batch` at a time. The log makes
    the result a score like the 2D models' (softmax of it gives the averaged probabilities back
    exactly, and its argmax is theirs), so saved scores and `--fuse` work unchanged.
    """
    probs = []
    for i in range(0, len(clips), batch):
        with autocast:
            scores = model(clips[i : i + batch].to(device, non_blocking=True))
        probs.append(torch.softmax(scores.float(), dim=1).cpu())
    mean = torch.cat(probs).mean(0)
    return torch.log(mean.clamp_min(torch.finfo(torch.float32).tiny))
