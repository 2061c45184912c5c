"""Train one phase of Table 2: config -> device/DDP -> data -> model -> loop -> checkpoint.

Reads top to bottom like nanoGPT's train.py. Runs on CPU, on one GPU (bf16 autocast,
channels_last) or on many through `torchrun` (DDP with gloo on CPU, nccl on CUDA). A checkpoint
holds everything needed for `--resume` to continue exactly where the run stopped. What training
shares with evaluation (device, data, model building, scoring, fusion) is in `strnet.runtime`.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from strnet.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic,
)
from strnet.config import ConfigError, TrainConfig, to_dict
from strnet.data import ClipDataset, ClippedStrideWarning, clipped_stride_message
from strnet.models import is_two_stream
from strnet.resolve import data_extract_settings, resolve_run
from strnet.runtime import (  # noqa: F401 - build_model, Context, ... kept importable from here
    Context,
    autocast_for,
    build_model,
    forward_scores,
    fused_scores,
    open_data,
    sampling_config,
    score_videos,
    setup_device,
    split_items,
    test_loader,
    topk_accuracy,
    train_dataset,
)
from strnet.scores import fuse_arrays
from strnet.weights import load_pretrained, strip_prefixes

# What a run writes into its folder (and `--force` deletes); the checkpoint first, so a kill while
# deleting leaves nothing that `--resume` would continue with half of its metrics.
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "curves.png", "config.json")
RUN_LEFTOVERS = (".checkpoint.pt.tmp", ".best.pt.tmp", ".metrics.jsonl.tmp")  # a kill's temp files


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message is one line."""


# --------------------------------------------------------------------------- data
class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch and yields `(epoch, index)` pairs.

    The shuffled order is a function of (seed, epoch) only, so skipping `start` samples of this
    rank reproduces the order an uninterrupted run would have seen. The epoch travels with each
    index, so persistent DataLoader workers (whose dataset copies never see `set_epoch`) draw
    the augmentation of the right epoch.
    """

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter([(self.epoch, i) for i in indices[self.start :]])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loader(
    cfg: TrainConfig, ctx: Context, reader=None
) -> tuple[ClipDataset, ResumableSampler, dict]:
    """Training dataset, its resumable distributed sampler and the DataLoader arguments."""
    reader = reader if reader is not None else open_data(cfg.data.root)
    dataset = train_dataset(cfg, reader)  # ClipDataset, or a 3D ResNet's Clip3dDataset
    sampler = ResumableSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.run.seed
    )
    loader_kw = dict(
        batch_size=cfg.optim.micro_batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        pin_memory=ctx.device.type == "cuda",
    )
    return dataset, sampler, loader_kw


class EpochStream(Sampler):
    """Endless `(epoch, index)` pairs: each epoch's order of this rank, cut to whole micro-batches.

    The orders are `ResumableSampler`'s (a function of seed and epoch), so the micro-batches are
    those of one DataLoader per epoch with `drop_last`; but one iterator runs across epochs, so
    workers keep prefetching over epoch boundaries. Iteration starts at `start` ({"epoch",
    "offset"}), set by `micro_batches` from the run's position.
    """

    def __init__(self, sampler: ResumableSampler, micro_batch: int) -> None:
        self.sampler, self.micro_batch = sampler, micro_batch
        self.start = {"epoch": 0, "offset": 0}

    def per_epoch(self) -> int:
        """Samples of this rank used per epoch (whole micro-batches only)."""
        return self.sampler.num_samples // self.micro_batch * self.micro_batch

    def __iter__(self):
        epoch, offset = self.start["epoch"], self.start["offset"]
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.start = offset
            yield from list(self.sampler)[: self.per_epoch() - offset]
            epoch, offset = epoch + 1, 0


def make_loader(dataset: ClipDataset, loader_kw: dict) -> DataLoader:
    """The one DataLoader of a run over an `EpochStream` of `loader_kw`'s sampler.

    Workers persist (`persistent_workers`) and prefetch across epochs, so epoch boundaries cost
    no restart; the loader's own generator keeps worker seeding off the global RNG.
    """
    kw = dict(loader_kw)
    stream = EpochStream(kw.pop("sampler"), kw["batch_size"])
    kw.update(drop_last=False, persistent_workers=kw.get("num_workers", 0) > 0)
    return DataLoader(dataset, sampler=stream, generator=torch.Generator(), **kw)


def micro_batches(
    dataset: ClipDataset,
    sampler: ResumableSampler,
    loader_kw: dict,
    pos: dict,
    *,
    loader: DataLoader | None = None,
):
    """Endless micro-batches; `pos` ({"epoch", "offset"}) is updated as batches are consumed.

    `offset` counts this rank's samples already used in `epoch`, so a checkpoint of `pos`
    restarts the stream at the same sample. `loader` comes from `make_loader` (built once per
    run); without it one is made here from `dataset` and `loader_kw` (whose sampler is `sampler`).
    """
    loader = loader if loader is not None else make_loader(dataset, loader_kw)
    stream: EpochStream = loader.sampler
    usable = stream.per_epoch()
    if usable == 0:
        raise ConfigError("training list is smaller than one micro-batch per rank")
    if pos["offset"] >= usable:  # stopped right after an epoch's last micro-batch
        pos["epoch"], pos["offset"] = pos["epoch"] + 1, 0
    stream.start = dict(pos)
    for batch in loader:
        pos["offset"] += len(batch["label"])
        if pos["offset"] >= usable:
            pos["epoch"], pos["offset"] = pos["epoch"] + 1, 0
        yield batch


# --------------------------------------------------------------------------- model
def initialise(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """Load the phase's starting weights (previous phase or ImageNet); return report lines.

    `init` loads into the whole model; `init_appearance`/`init_motion` load a single-stream
    checkpoint into that stream of a two-stream model (Sec. 3.4). RGB conv1 filters meeting a
    flow stack follow `model.conv1_init`; 1x1 filters meeting temporal convs are inflated (eq. 5).
    """
    m, lines = cfg.model, []
    targets = [("init", model)]
    if is_two_stream(m.name):
        targets += [("init_appearance", model.appearance), ("init_motion", model.motion)]
    elif m.init_appearance or m.init_motion:
        raise ConfigError("model.init_appearance/init_motion need a two-stream model")
    for key, module in targets:
        path = getattr(m, key)
        if path:
            report = load_pretrained(module, path, conv1_init=m.conv1_init)
            lines.append(f"{key} {path}: {report.line()}")
    return lines


def to_channels_last(model: torch.nn.Module) -> None:
    """channels_last for the 4D conv weights; temporal conv weights are 5D and stay as they are."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def clip_loss(
    scores: dict[str, torch.Tensor], labels: torch.Tensor, kind: str = "softmax"
) -> torch.Tensor:
    """Sum over streams of the mean loss over every (clip, chunk) position: cross-entropy, or
    with `kind` "hinge" the multi-class SVM hinge (`optim.loss`).

    The paper keeps one loss per input chunk and per stream (Sec. 3.4, no joint classifier).
    """
    loss = F.multi_margin_loss if kind == "hinge" else F.cross_entropy
    total = 0.0
    for s in scores.values():
        b, t, k = s.shape
        total = total + loss(s.float().reshape(b * t, k), labels.repeat_interleave(t))
    return total


def lr_at(step: int, lrs: list[float], iterations: list[int]) -> float:
    """Step schedule of Table 2: `lrs[i]` for `iterations[i]` steps, then the next."""
    edge = 0
    for lr, n in zip(lrs, iterations, strict=True):
        edge += n
        if step < edge:
            return lr
    return lrs[-1]


# --------------------------------------------------------------------------- logging
def log_metrics(out: Path, record: dict, writer=None) -> None:
    """Append one JSON line to `metrics.jsonl` (and TensorBoard if a writer is open)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                writer.add_scalar(key, value, record["step"])


def tensorboard_writer(out: Path, purge_step: int | None = None):
    """A SummaryWriter when tensorboard is installed, else None (it is optional).

    `purge_step` (a resumed run's first step) hides the events a killed run logged from that
    step on, so TensorBoard, like metrics.jsonl, holds each step once.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard missing or broken: skip it
        return None
    return SummaryWriter(str(out / "tb"), purge_step=purge_step)


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss and accuracy curves of a run (validation top-1 too, if any) as a PNG."""
    if not metrics_path.is_file():
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["loss"] for r in rows])
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax2.plot(steps, [r["acc"] for r in rows], label="training (fused)")
    val = [(r["step"], r["val_top1"]) for r in rows if "val_top1" in r]
    if val:
        ax2.plot(*zip(*val, strict=True), marker="o", label="validation top-1")
        ax2.legend()
    ax2.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line a kill or a full disk cut short is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def format_eta(seconds: float) -> str:
    """Seconds as `8m32s` / `1h02m05s` / `7s`, for the progress line."""
    s = int(round(max(seconds, 0)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(step: int, total: int, record: dict, seconds_per_step: float) -> str:
    """`train step 40/200 loss 1.234 acc 0.41 3.2 s/step eta 8m32s`: what `-q` prints.

    One plain line a parent process can read (the pipeline runner shows them).
    """
    eta = format_eta(seconds_per_step * (total - step))
    return (
        f"train step {step}/{total} loss {record['loss']:.3f} acc {record['acc']:.2f} "
        f"{seconds_per_step:.3g} s/step eta {eta}"
    )


def show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` of the CLI: `warning: <message>` on one line of stderr."""
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


# --------------------------------------------------------------------------- checkpoint
def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters (not BN running stats), to check that DDP ranks agree."""
    import hashlib

    raw = model.module if hasattr(model, "module") else model
    h = hashlib.sha256()
    for name, p in sorted(raw.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_state(
    model,
    optimizer,
    step: int,
    pos: dict,
    cfg: TrainConfig,
    *,
    classes: list[str] | None = None,
    best: dict | None = None,
    extract_settings: dict | None = None,
) -> dict:
    """Everything `--resume` needs, as weights_only-loadable values.

    `classes` are the class names (index order); `best` the best validation so far
    ({"step", "val_top1"}) or None; `extract_settings` how the training videos were prepared
    (`meta.json` "settings"), which `strnet predict` repeats on new videos.
    """
    raw = model.module if hasattr(model, "module") else model
    return {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "schedule": {"lrs": list(cfg.optim.lrs), "iterations": list(cfg.optim.iterations)},
        "sampler": dict(pos),
        "rng": rng_state(),
        "config": to_dict(cfg),
        "classes": list(classes or []),
        "best": dict(best) if best else None,
        "extract_settings": dict(extract_settings or {}),
    }


def resume_from(path: Path, model, optimizer) -> tuple[int, dict]:
    """Restore model, optimizer and RNG states; return (step, sampler position)."""
    state = load_resume(path, model, optimizer)
    return state["step"], state["pos"]


def load_resume(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states; {"step", "pos", "best"} of the checkpoint.

    A checkpoint that lacks a part or does not fit the model is a one-line CheckpointError.
    """
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "rng", "step", "sampler") if k not in ckpt]
    if missing:
        raise CheckpointError(f"'{path}' is not a resumable strnet checkpoint (no {missing[0]!r})")
    try:
        model.load_state_dict(strip_prefixes(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"'{path}' does not fit the model of this run: {first}") from None
    set_rng_state(ckpt["rng"])
    best = ckpt.get("best")
    return {"step": int(ckpt["step"]), "pos": dict(ckpt["sampler"]), "best": best or None}


@torch.no_grad()
def recompute_bn_statistics(model, batches, count: int, two_stream: bool, ctx, autocast) -> None:
    """Precise BN (as PySlowFast): BN statistics re-estimated with the final weights.

    Running statistics are an exponential average over weights that kept changing; here they
    become the plain average over `count` training micro-batches of the finished model.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(count):
        with autocast:
            forward_scores(model, next(batches), two_stream, ctx.device)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


# --------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One training run in progress: what the loop reads and updates."""

    cfg: TrainConfig
    ctx: Context
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: ClipDataset
    loader: DataLoader
    loader_kw: dict
    classes: list[str]
    accum: int  # micro-batches per SGD step on this rank
    total: int  # last step of this run
    step: int = 0
    pos: dict = field(default_factory=lambda: {"epoch": 0, "offset": 0})  # sampler position
    best: dict | None = None  # best validation so far: {"step", "val_top1"}
    val_loader: DataLoader | None = None  # the test list, centre crops (run.val_every > 0)
    val_labels: np.ndarray | None = None
    writer: object = None  # TensorBoard, when installed (rank 0)
    warned_clipped: bool = False  # the short-video warning is given once per run
    extract_settings: dict | None = None  # how the training videos were extracted (predict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.out)

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def state(self) -> dict:
        """The checkpoint of the run as it stands (`checkpoint_state`)."""
        return checkpoint_state(
            self.model, self.optimizer, self.step, self.pos, self.cfg,
            classes=self.classes, best=self.best, extract_settings=self.extract_settings,
        )  # fmt: skip


def check_out(out: Path, resume: bool, force: bool) -> None:
    """Refuse to train over an existing run unless told: `--resume` continues, `--force` replaces.

    A folder holding any file a run writes (`RUN_FILES`, `tb/`) is a run folder; other files in
    it are left alone. Nothing is deleted here (see `clear_out`).
    """
    ckpt = out / "checkpoint.pt"
    if resume and force:
        raise ConfigError("--resume continues a run and --force replaces it: choose one")
    if resume:
        if not ckpt.is_file():
            raise CheckpointError(f"nothing to resume: {str(ckpt)!r} not found")
        return
    if force:
        return
    if ckpt.is_file():
        raise ConfigError(
            f"run folder '{out}' already holds checkpoint.pt: use --resume to continue it or "
            "a new --out (--force replaces it)"
        )
    found = [name for name in (*RUN_FILES, "tb") if (out / name).exists()]
    if found:
        raise ConfigError(
            f"run folder '{out}' already holds {', '.join(found)} of a run with no checkpoint to "
            "resume: use --force to replace it or a new --out"
        )


def clear_out(out: Path) -> None:
    """Delete what an earlier run wrote into `out` (`--force`), the checkpoint first."""
    for name in (*RUN_FILES, *RUN_LEFTOVERS):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric rows of steps <= `step` (a resumed run logs later steps again).

    Lines a kill cut short are dropped; the file is replaced atomically, so a kill here loses
    no row of the steps kept.
    """
    if path.is_file():
        keep = [row for row in read_metrics(path) if row["step"] <= step]
        text = "".join(json.dumps(row) + "\n" for row in keep).encode()
        write_atomic(path, lambda f: f.write(text))


def start_run(cfg: TrainConfig, ctx: Context, resume: bool, force: bool) -> Run:
    """Data, resolved config, model, optimizer and (on resume) the saved state of a run.

    An earlier run's files are deleted (`force`) only once data, config and model are known to
    be good, so a `--force` with a typo costs nothing.
    """
    out, o = Path(cfg.run.out), cfg.optim
    check_out(out, resume, force)
    if o.batch_size % (o.micro_batch * ctx.world_size):
        raise ConfigError("optim.batch_size must be a multiple of micro_batch x world size")
    reader = open_data(cfg.data.root)
    classes, notes = resolve_run(cfg, reader, out / "checkpoint.pt" if resume else None)
    extract_settings, more = data_extract_settings(reader, split_items(cfg, "train"))
    notes += more
    torch.manual_seed(cfg.run.seed)
    dataset, _, loader_kw = build_loader(cfg, ctx, reader)
    model = build_model(cfg)
    notes += [] if resume else initialise(model, cfg)
    model.to(ctx.device)
    if ctx.device.type == "cuda":
        to_channels_last(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=o.lrs[0], momentum=o.momentum, weight_decay=o.weight_decay
    )
    total = sum(o.iterations) if cfg.run.max_steps <= 0 else cfg.run.max_steps
    accum = o.batch_size // (o.micro_batch * ctx.world_size)
    run = Run(cfg, ctx, model, optimizer, dataset, make_loader(dataset, loader_kw), loader_kw,
              classes, accum, total, extract_settings=extract_settings)  # fmt: skip
    if resume:
        state = load_resume(out / "checkpoint.pt", model, optimizer)
        run.step, run.pos, run.best = state["step"], state["pos"], state["best"]
        fixed = restore_best(out, run.best, run.step) if ctx.is_main else None
        notes += [fixed] if fixed else []
    if cfg.run.sync_bn and ctx.world_size > 1:
        run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    if ctx.world_size > 1:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None
        )
    if cfg.run.val_every and ctx.is_main:
        items = split_items(cfg, "test")
        run.val_loader = test_loader(cfg, reader, items, protocol="center",
                                     num_workers=cfg.data.num_workers, persistent=True)  # fmt: skip
        run.val_labels = np.array([label for _, label in items], dtype=np.int64)
    if ctx.is_main:
        if not resume:
            clear_out(out)
        open_run_folder(run, notes, resume)
    return run


def open_run_folder(run: Run, notes: list[str], resume: bool) -> None:
    """Rank 0: config.json (resolved config and class names), TensorBoard, the init notes."""
    run.out.mkdir(parents=True, exist_ok=True)
    info = {**to_dict(run.cfg), "classes": run.classes}
    text = (json.dumps(info, indent=1) + "\n").encode()
    write_atomic(run.out / "config.json", lambda f: f.write(text))
    if resume:
        truncate_metrics(run.out / "metrics.jsonl", run.step)
    run.writer = tensorboard_writer(run.out, purge_step=run.step + 1 if resume else None)
    for line in notes:
        print(line)


def warn_clipped(run: Run, batch: dict) -> None:
    """Warn once per run (per process) when a video was too short for its drawn stride tau."""
    if not run.warned_clipped:
        message = clipped_stride_message(batch, run.dataset.items, run.dataset.cfg)
        if message:
            warnings.warn(message, ClippedStrideWarning, stacklevel=2)
            run.warned_clipped = True


def train_step(run: Run, stream, autocast) -> dict:
    """One SGD step over `run.accum` micro-batches; its metrics record."""
    o, ctx = run.cfg.optim, run.ctx
    lr = lr_at(run.step, o.lrs, o.iterations)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    two_stream = is_two_stream(run.cfg.model.name)
    t0, data_s = time.perf_counter(), 0.0
    stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
    for micro in range(run.accum):
        t_data = time.perf_counter()
        batch = next(stream)
        data_s += time.perf_counter() - t_data
        warn_clipped(run, batch)
        labels = batch["label"].to(ctx.device)
        sync = micro == run.accum - 1 or ctx.world_size == 1
        with nullcontext() if sync else run.model.no_sync(), autocast:
            scores = forward_scores(run.model, batch, two_stream, ctx.device)
            loss = clip_loss(scores, labels, run.cfg.optim.loss)
        (loss / run.accum).backward()
        pred = fused_scores(scores).argmax(1)
        stats += torch.tensor([loss.item(), (pred == labels).sum().item(), len(labels)])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if ctx.world_size > 1:
        dist.all_reduce(stats)
    loss_mean = stats[0].item() / (run.accum * ctx.world_size)
    if not math.isfinite(loss_mean):
        raise TrainingError(f"loss is {loss_mean} at step {run.step}; lower optim.lrs")
    step_s = time.perf_counter() - t0
    return {
        "step": run.step,
        "lr": lr,
        "loss": loss_mean,
        "acc": stats[1].item() / stats[2].item(),
        "samples_per_s": stats[2].item() / step_s,
        "step_s": step_s,
        "data_s": data_s,
        "epoch": run.pos["epoch"],
    }


def validate(run: Run) -> float | None:
    """Top-1 of the fused video scores on the test list (centre protocol) on rank 0, else None.

    The scoring is evaluate's (`score_videos`); the model returns to training mode after.
    """
    top1 = None
    if run.ctx.is_main and run.val_loader is not None:
        streams = score_videos(
            run.raw_model, run.val_loader, two_stream=is_two_stream(run.cfg.model.name),
            device=run.ctx.device, flips=False,
        )  # fmt: skip
        top1 = topk_accuracy(fuse_arrays(streams), run.val_labels, 1)
    if run.ctx.world_size > 1:
        dist.barrier()
    return top1


def save_best(run: Run) -> None:
    """Write checkpoint.pt, then best.pt as its copy, both knowing this step is the best.

    Checkpoint first: best.pt never belongs to a step the run's checkpoint has not reached, so a
    resume cannot keep a best.pt from a future it then replays differently (`restore_best`).
    """
    data = save_checkpoint(run.out / "checkpoint.pt", run.state()).read_bytes()
    write_atomic(run.out / "best.pt", lambda f: f.write(data))


def restore_best(out: Path, best: dict | None, step: int) -> str | None:
    """On resume, make best.pt the one the checkpoint knows; a note when it had to be fixed.

    A kill between checkpoint.pt and best.pt in `save_best` leaves the older best.pt: the
    checkpoint at the best step is that model, so it is copied. A best.pt of another step than
    the checkpoint's best (written by strnet before this order) is removed.
    """
    path = out / "best.pt"
    known = None
    if path.is_file():
        try:
            known = load_checkpoint(path).get("step")
        except CheckpointError:
            known = None
    if best is not None and known == best["step"]:
        return None
    if best is not None and best["step"] == step:
        data = (out / "checkpoint.pt").read_bytes()
        write_atomic(path, lambda f: f.write(data))
        return f"best.pt restored from checkpoint.pt (step {step}, the best)"
    if path.is_file():
        path.unlink()
        return f"best.pt (step {known}) was not the best the checkpoint knows: removed"
    return None


def after_step(run: Run, record: dict, clock: tuple[float, int], autocast) -> None:
    """End of a step: precise BN (last step), validation and best.pt, logs, checkpoint.pt."""
    cfg, step, main = run.cfg, run.step, run.ctx.is_main
    last = step == run.total
    if last and cfg.run.precise_bn > 0:
        batches = micro_batches(run.dataset, run.loader.sampler, run.loader_kw, dict(run.pos),
                                loader=run.loader)  # fmt: skip
        two_stream = is_two_stream(cfg.model.name)
        recompute_bn_statistics(run.model, batches, cfg.run.precise_bn, two_stream, run.ctx,
                                autocast)  # fmt: skip
        batches.close()
    val_due = cfg.run.val_every > 0 and (step % cfg.run.val_every == 0 or last)
    saved = False  # checkpoint.pt already written at this step (with a new best)
    top1 = validate(run) if val_due else None
    if top1 is not None:
        record["val_top1"] = top1
        if run.best is None or top1 > run.best["val_top1"]:  # a tie keeps the earlier step
            run.best = {"step": step, "val_top1": top1}
            save_best(run)
            saved = True
    log_due = step % cfg.run.log_every == 0 or last
    if main and (log_due or top1 is not None):
        log_metrics(run.out, record, run.writer)
    if main and log_due and not cfg.run.progress:
        per_step = (time.perf_counter() - clock[0]) / max(step - clock[1], 1)
        print(progress_line(step, run.total, record, per_step), file=sys.stderr, flush=True)
    if step % cfg.run.ckpt_every == 0 or last:
        if main and not saved:
            save_checkpoint(run.out / "checkpoint.pt", run.state())
        if run.ctx.world_size > 1:
            dist.barrier()


def train(
    cfg: TrainConfig, *, resume: bool = False, force: bool = False, overwrite: bool = False
) -> dict:
    """Run (or resume) one training phase; return a summary with the final step and metrics.

    Writes `config.json`, `metrics.jsonl`, `checkpoint.pt`, `best.pt` (with `run.val_every`)
    and `curves.png` to `cfg.run.out`. `cfg` is copied, then resolved from the data and init
    checkpoints (`strnet.resolve`). A folder holding a run's files needs `resume` (which refuses
    a changed batch, schedule or architecture) or `force` (`overwrite` is its older name).
    """
    cfg, force = copy.deepcopy(cfg), force or overwrite
    check_out(Path(cfg.run.out), resume, force)
    ctx = setup_device(cfg.run.device)
    run = start_run(cfg, ctx, resume, force)
    autocast = autocast_for(ctx.device)
    from tqdm import tqdm

    show = ctx.is_main and cfg.run.progress
    bar = tqdm(total=run.total, initial=run.step, disable=not show, desc="train")
    stream = micro_batches(run.dataset, run.loader.sampler, run.loader_kw, run.pos,
                           loader=run.loader)  # fmt: skip
    clock, last = (time.perf_counter(), run.step), {}
    run.model.train()
    while run.step < run.total:
        last = train_step(run, stream, autocast)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.2f}")
        after_step(run, last, clock, autocast)
    bar.close()
    stream.close()
    if ctx.is_main:
        plot_curves(run.out / "metrics.jsonl", run.out / "curves.png")
        if run.writer is not None:
            run.writer.close()
    summary = {"step": run.step, "out": str(run.out), "weights_digest": weights_digest(run.model)}
    return {**summary, "classes": run.classes, "best": run.best, **last}
