"""Training/test sampling and augmentation of ST-ResNet (Feichtenhofer et al. 2016, Sec. 3.4).

Pure functions on numpy arrays (chunk positions with stride tau, flow stacks, crops, flips,
normalisation) plus `ClipDataset`, a torch Dataset over a flowprep reader. Randomness comes only
from a per-sample generator seeded by (seed, epoch, index), so a resumed run draws the same samples.

Conventions: frame indices are 0-based; flow k goes from frame k to frame k+1 and pairs with RGB
frame k; a chunk at frame p is RGB frame p and the flow stack p+o, p+o+1, ..., p+o+L-1 with
channels interleaved x_{p+o}, y_{p+o}, x_{p+o+1}, ... The offset o is `flow_offset`: "center"
(the default, o = -L/2: flows p-L/2 ... p+L/2-1 around the frame, as the authors'
`cnn_get_im_flow_batch.m`, whose `frameOffsets` are -L/2 ... L/2-1) or an integer (0: the stack
starts at the frame, strnet before 2026-12). Chunks are sampled among the frames whose whole stack
lies inside the video; flow indices are clamped to the video only for videos shorter than a stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from flowprep.layout import read_list

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
FLOW_MEAN = 128.0  # quantized flow is centred on 128 (zero displacement), Sec. 3.4
# Motion crop sizes {256, 224, 192, 168} of the paper, as fractions of the 256-pixel short side.
MOTION_CROP_SCALES = (256 / 256, 224 / 256, 192 / 256, 168 / 256)


@dataclass(frozen=True)
class CropBox:
    """A crop rectangle `[y, y + h) x [x, x + w)` in pixel coordinates."""

    y: int
    x: int
    h: int
    w: int


# --------------------------------------------------------------------------- temporal sampling
FLOW_OFFSETS = ("center",)  # named values of `flow_offset`; any integer is allowed too


def stack_offset(flow_offset: int | str, flow_stack: int) -> int:
    """The first flow of a stack relative to its frame: "center" -> -(L // 2), an int as is."""
    if flow_offset in FLOW_OFFSETS:
        return -(flow_stack // 2)
    if isinstance(flow_offset, bool) or not isinstance(flow_offset, int):
        raise ValueError(f"flow_offset must be 'center' or an integer, got {flow_offset!r}")
    return flow_offset


def position_frames(
    num_frames: int, num_flows: int, flow_stack: int, use_flow: bool, offset: int = 0
) -> tuple[int, int]:
    """(first frame, count) of the frames a chunk may sit at: chunk position i is frame first + i.

    With flow, a chunk at frame p needs the whole stack p+offset ... p+offset+L-1 inside the video
    (and frame p itself); without flow any frame is valid. A video too short for a stack gets one
    position, the frame whose (clamped) stack is most nearly centred on the video's flows.
    """
    if not use_flow:
        return 0, max(num_frames, 1)
    first = max(0, -offset)
    last = min(num_frames - 1, num_flows - flow_stack - offset)
    if last >= first:
        return first, last - first + 1
    middle = (num_flows - flow_stack) // 2 - offset
    return int(np.clip(middle, 0, max(num_frames - 1, 0))), 1


def num_positions(
    num_frames: int, num_flows: int, flow_stack: int, use_flow: bool, offset: int = 0
) -> int:
    """Number of valid chunk positions in a video (`position_frames`); at least one."""
    return position_frames(num_frames, num_flows, flow_stack, use_flow, offset)[1]


def sample_chunk_positions(
    n_positions: int, num_chunks: int, tau_range: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Start positions of `num_chunks` chunks with a random stride tau in `tau_range` (Table 2).

    If the video is too short for tau, tau is reduced to the largest that fits; if even tau = 1 does
    not fit, all positions are used and padded symmetrically in time by repeating the end ones.
    """
    return sample_chunks(n_positions, num_chunks, tau_range, rng)[0]


def sample_chunks(
    n_positions: int, num_chunks: int, tau_range: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """`sample_chunk_positions` and whether the drawn tau did not fit (reduced or padded).

    The same draws in the same order, so both give the same positions for the same generator.
    """
    lo, hi = tau_range
    if not 1 <= lo <= hi:
        raise ValueError(f"tau range must satisfy 1 <= min <= max, got {tau_range}")
    drawn = int(rng.integers(lo, hi + 1))
    if num_chunks == 1:
        return np.array([int(rng.integers(0, n_positions))], dtype=np.int64), False
    tau = min(drawn, (n_positions - 1) // (num_chunks - 1))
    if tau >= 1:
        start = int(rng.integers(0, n_positions - (num_chunks - 1) * tau))
        return start + tau * np.arange(num_chunks, dtype=np.int64), tau < drawn
    return pad_symmetric(np.arange(n_positions, dtype=np.int64), num_chunks), True


def pad_symmetric(positions: np.ndarray, length: int) -> np.ndarray:
    """Pad a position sequence to `length` by repeating its first/last entry on both sides.

    Half the padding goes before and half after, so the clip stays centred in time.
    """
    missing = length - len(positions)
    if missing <= 0:
        return positions[:length]
    before = missing // 2
    return np.pad(positions, (before, missing - before), mode="edge")


def even_positions(n_positions: int, count: int = 25) -> np.ndarray:
    """`count` positions spread evenly over a video, first to last (the 25-frame test protocol).

    Short videos repeat positions, which keeps the number of test chunks fixed.
    """
    return np.round(np.linspace(0, n_positions - 1, count)).astype(np.int64)


def flow_stack_indices(
    position: int, flow_stack: int, num_flows: int, offset: int = 0
) -> np.ndarray:
    """Indices of the `flow_stack` consecutive flows of the chunk at frame `position`: they start
    at `position + offset` and are clamped to the video (the first/last flow repeats there)."""
    return np.clip(position + offset + np.arange(flow_stack), 0, max(num_flows - 1, 0))


def stack_flows(flows: np.ndarray) -> np.ndarray:
    """Interleave (L, H, W, 2) flows into an (H, W, 2L) stack x1, y1, x2, y2, ...

    Channel 2k is the x component of flow k, channel 2k+1 its y component.
    """
    length, height, width, _ = flows.shape
    return np.ascontiguousarray(flows.transpose(1, 2, 0, 3).reshape(height, width, 2 * length))


# --------------------------------------------------------------------------- spatial crops
def motion_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scales: Sequence[float] = MOTION_CROP_SCALES,
) -> CropBox:
    """Random corner or centre crop with width and height drawn from the paper's sizes.

    Sizes {256, 224, 192, 168} are given as fractions of the short side (Sec. 3.4), so the same
    rule holds on small test frames.
    """
    short = min(height, width)
    ch = min(height, max(1, round(short * float(rng.choice(scales)))))
    cw = min(width, max(1, round(short * float(rng.choice(scales)))))
    ys = (0, 0, height - ch, height - ch, (height - ch) // 2)
    xs = (0, width - cw, 0, width - cw, (width - cw) // 2)
    k = int(rng.integers(0, 5))
    return CropBox(ys[k], xs[k], ch, cw)


def appearance_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    base_fraction: float = 224 / 256,
    jitter: float = 0.25,
    border: float = 0.25,
) -> CropBox:
    """Crop of ±25 % jittered width/height placed at most 25 % from an image border (Sec. 3.4).

    The base size is 224/256 of the short side; each side picks a border at random and an offset
    of up to `border` of the image size from it.
    """
    base = min(height, width) * base_fraction
    ch = int(np.clip(round(base * (1 + rng.uniform(-jitter, jitter))), 1, height))
    cw = int(np.clip(round(base * (1 + rng.uniform(-jitter, jitter))), 1, width))

    def offset(size: int, crop: int) -> int:
        d = int(rng.integers(0, min(int(border * size), size - crop) + 1))
        return d if rng.random() < 0.5 else size - crop - d

    return CropBox(offset(height, ch), offset(width, cw), ch, cw)


def center_crop_box(height: int, width: int, size: int) -> CropBox:
    """Central `size` x `size` crop (clipped to the frame), for the cheap test protocol."""
    ch, cw = min(size, height), min(size, width)
    return CropBox((height - ch) // 2, (width - cw) // 2, ch, cw)


def crop_resize(images: np.ndarray, box: CropBox, size: int | None) -> np.ndarray:
    """Apply one crop to every image of (N, H, W, C) and resize to `size` x `size` (bilinear).

    The same box for all N keeps a flow stack and all chunks of a clip aligned. `size=None` keeps
    the crop size.
    """
    out = images[:, box.y : box.y + box.h, box.x : box.x + box.w]
    if size is None or (box.h == size and box.w == size):
        return np.ascontiguousarray(out)
    resized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in out]
    return np.stack([r.reshape(size, size, images.shape[-1]) for r in resized])


def hflip_rgb(rgb: np.ndarray) -> np.ndarray:
    """Mirror (..., H, W, 3) RGB images left-right."""
    return np.ascontiguousarray(rgb[..., :, ::-1, :])


def hflip_flow(flow: np.ndarray) -> np.ndarray:
    """Mirror quantized (..., H, W, 2L) flow left-right and negate its x channels as 255 - q.

    Mirroring reverses horizontal motion, so without the negation a flipped stack would show
    motion the wrong way (x channels are the even ones).
    """
    out = np.array(flow[..., :, ::-1, :], copy=True)
    out[..., 0::2] = 255 - out[..., 0::2]
    return out


def hflip_normalized_flow(flow: torch.Tensor) -> torch.Tensor:
    """Mirror normalized (..., 2L, H, W) flow and negate x exactly as `hflip_flow` does.

    In normalized units x = q - 128, so 255 - q becomes -x - 1 (test-time flips, Sec. 3.4).
    """
    out = torch.flip(flow, dims=[-1])
    out[..., 0::2, :, :] = -out[..., 0::2, :, :] - 1
    return out


def normalize_rgb(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) with ImageNet mean/std.

    The ImageNet-initialised ResNet50 expects these statistics.
    """
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def normalize_flow(flow: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 2L) -> float (N, 2L, H, W) minus the flow mean 128 (Sec. 3.4).

    Values stay in quantized units, as in the authors' code.
    """
    x = flow.astype(np.float32) - FLOW_MEAN
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------- dataset
def read_frames(read, indices: np.ndarray) -> np.ndarray:
    """Call a reader method on the sorted unique indices and expand back to `indices`.

    Padded clips repeat positions; HDF5 fancy indexing wants increasing, unique indices.
    """
    unique, inverse = np.unique(indices, return_inverse=True)
    return read([int(i) for i in unique])[inverse]


@dataclass
class SamplingConfig:
    """What one training/test sample holds; fields mirror Table 2 and Sec. 3.4."""

    num_chunks: int = 1  # T temporal chunks per clip (1, 5 or 11 in Table 2)
    tau_min: int = 1  # smallest stride between chunks in frames
    tau_max: int = 1  # largest stride between chunks in frames
    flow_stack: int = 10  # L consecutive flows per motion input
    flow_offset: int | str = "center"  # first flow relative to the chunk's frame; "center" = -L/2
    use_rgb: bool = True  # load the appearance input
    use_flow: bool = True  # load the motion input
    crop: str = "appearance"  # training crop rule: "appearance", "motion", "center" or "none"
    crop_size: int = 224  # output side after crop + resize
    flip_p: float = 0.5  # probability of a horizontal flip
    test_chunks: int = 25  # chunks sampled evenly at test time


def read_split_list(path: str | Path) -> list[tuple[str, int]]:
    """Read an mmaction2-style list `<video_id> <num_frames> <label_index>` into (id, label) pairs.

    The list files sit beside the frame folders (`train_split1.txt`, ...); their format is
    flowprep's (`flowprep.layout.read_list`).
    """
    return read_list(path)


class ClippedStrideWarning(UserWarning):
    """A training video was too short for the sampled chunk stride tau (reduced or padded)."""


def check_in_reader(reader, items: Sequence[tuple[str, int]]) -> None:
    """Every listed video is in the data; else a KeyError naming the first and how many more."""
    missing = [vid for vid, _ in items if vid not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KeyError(f"video {missing[0]!r} of the list is not in the data{more}")


class ClipDataset(Dataset):
    """Clips of a flowprep reader for training (random) or testing (evenly spaced chunks).

    Each item is a dict: `rgb` (T, 3, h, w) and/or `flow` (T, 2L, h, w) float tensors, `label`,
    `index`; training items also hold `num_positions` and `tau_clipped` (the video was too short
    for the drawn tau, see `clipped_stride_message`). At test time T = `test_chunks` and a flipped
    copy is not added (see evaluate). An item is asked for by `index` (the current epoch's draws)
    or by `(epoch, index)`, so DataLoader workers that outlive an epoch draw the right samples.
    """

    def __init__(
        self,
        reader,
        items: Sequence[tuple[str, int]],
        cfg: SamplingConfig,
        *,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        check_in_reader(reader, items)
        self.reader, self.items, self.cfg = reader, list(items), cfg
        self.train, self.seed, self.epoch = train, seed, 0
        stack_offset(cfg.flow_offset, cfg.flow_stack)  # a bad offset fails here, not in a worker

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws `__getitem__` makes (exact resume)."""
        self.epoch = epoch

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        """Generator of sample `index` in `epoch` (default: the current one), independent of
        worker and order."""
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])

    def positions(self, video, rng: np.random.Generator) -> np.ndarray:
        """Chunk frames for a video: random stride tau for training, even spacing for tests."""
        return self.sample_positions(video, rng)[0]

    def sample_positions(self, video, rng: np.random.Generator) -> tuple[np.ndarray, int, bool]:
        """(chunk frames, number of valid positions, whether the drawn tau did not fit)."""
        cfg = self.cfg
        first, n = position_frames(
            video.num_frames, video.num_flows, cfg.flow_stack, cfg.use_flow, self.offset
        )
        if self.train:
            pos, clipped = sample_chunks(n, cfg.num_chunks, (cfg.tau_min, cfg.tau_max), rng)
            return first + pos, n, clipped
        return first + even_positions(n, cfg.test_chunks), n, False

    @property
    def offset(self) -> int:
        """The first flow of a stack relative to its chunk's frame (`flow_offset` resolved)."""
        return stack_offset(self.cfg.flow_offset, self.cfg.flow_stack)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        cfg, rng = self.cfg, self.rng(index, epoch)
        vid, label = self.items[index]
        video = self.reader[vid]
        pos, n_positions, clipped = self.sample_positions(video, rng)
        rgb = read_frames(video.rgb, pos) if cfg.use_rgb else None
        flow = None
        if cfg.use_flow:
            idx = np.concatenate(
                [flow_stack_indices(p, cfg.flow_stack, video.num_flows, self.offset) for p in pos]
            )
            raw = read_frames(video.flow, idx)
            raw = raw.reshape(len(pos), cfg.flow_stack, *raw.shape[1:])
            flow = np.stack([stack_flows(s) for s in raw])
        height, width = (rgb if rgb is not None else flow).shape[1:3]
        box, size = self.crop_box(height, width, rng)
        flip = self.train and rng.random() < cfg.flip_p
        out: dict = {"label": int(label), "index": int(index)}
        if self.train:
            out.update(num_positions=int(n_positions), tau_clipped=bool(clipped))
        if rgb is not None:
            rgb = crop_resize(rgb, box, size)
            out["rgb"] = normalize_rgb(hflip_rgb(rgb) if flip else rgb)
        if flow is not None:
            flow = crop_resize(flow, box, size)
            out["flow"] = normalize_flow(hflip_flow(flow) if flip else flow)
        return out

    def crop_box(
        self, height: int, width: int, rng: np.random.Generator
    ) -> tuple[CropBox, int | None]:
        """The crop shared by every frame and flow of the sample, and its output size."""
        rule = self.cfg.crop if self.train else ("center" if self.cfg.crop != "none" else "none")
        if rule == "motion":
            return motion_crop_box(height, width, rng), self.cfg.crop_size
        if rule == "appearance":
            return appearance_crop_box(height, width, rng), self.cfg.crop_size
        if rule == "center":
            return center_crop_box(height, width, self.cfg.crop_size), None
        if rule == "none":
            return CropBox(0, 0, height, width), None
        raise ValueError(f"unknown crop rule {rule!r}; use appearance, motion, center or none")


def clipped_stride_message(batch: dict, items: Sequence[tuple[str, int]], cfg: SamplingConfig):
    """One line naming the first video of a training batch too short for its drawn tau, or None.

    The trainer warns with it once per run (`ClippedStrideWarning`), not once per sample.
    """
    clipped = batch.get("tau_clipped")
    if clipped is None or not bool(torch.as_tensor(clipped).any()):
        return None
    first = int(torch.as_tensor(clipped).nonzero()[0, 0])
    vid = items[int(batch["index"][first])][0]
    n = int(batch["num_positions"][first])
    return (
        f"video {vid!r} has {n} chunk positions, too few for {cfg.num_chunks} chunks at stride "
        f"tau {cfg.tau_min}-{cfg.tau_max}: tau reduced or positions padded for such videos "
        "(warned once per run)"
    )
