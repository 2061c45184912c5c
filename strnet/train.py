"""Train one phase of Table 2: config -> device/DDP -> data -> model -> loop -> checkpoint.

Reads top to bottom like nanoGPT's train.py. Runs on CPU, on one GPU (bf16 autocast,
channels_last) or on many through `torchrun` (DDP with gloo on CPU, nccl on CUDA). A checkpoint
holds everything needed for `--resume` to continue exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from strnet.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from strnet.config import ConfigError, TrainConfig, load_config, to_dict
from strnet.data import ClipDataset, SamplingConfig, read_split_list
from strnet.models import MODEL_NAMES, create_model, is_two_stream
from strnet.weights import WeightsError, load_pretrained, strip_prefixes


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


def setup_device(preference: str = "auto") -> Context:
    """Pick the device and join the process group when torchrun started us.

    Backend is nccl on CUDA and gloo on CPU; without WORLD_SIZE > 1 no group is created.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is 'cuda' but no GPU is available")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(device, rank, local, world)


# --------------------------------------------------------------------------- data
class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch, after `start` samples of this rank.

    The shuffled order is a function of (seed, epoch) only, so skipping reproduces the order
    an uninterrupted run would have seen.
    """

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def sampling_config(cfg: TrainConfig) -> SamplingConfig:
    """The dataset-side view of the [data] section."""
    d = cfg.data
    return SamplingConfig(
        num_chunks=d.num_chunks,
        tau_min=d.tau_min,
        tau_max=d.tau_max,
        flow_stack=d.flow_stack,
        use_rgb=d.use_rgb,
        use_flow=d.use_flow,
        crop=d.crop,
        crop_size=d.crop_size,
        flip_p=d.flip_p,
        test_chunks=d.test_chunks,
    )


def split_items(cfg: TrainConfig, subset: str) -> list[tuple[str, int]]:
    """(video_id, label) pairs of the train or test list of `cfg.data.split`."""
    given = cfg.data.train_list if subset == "train" else cfg.data.test_list
    path = Path(given) if given else Path(cfg.data.root) / f"{subset}_split{cfg.data.split}.txt"
    if not path.is_file():
        raise ConfigError(f"{subset} list {str(path)!r} not found (set data.{subset}_list)")
    return read_split_list(path)


def open_data(root: str):
    """Open a frame-folder root or shard directory through flowprep's reader API."""
    from flowprep.reader import open_reader

    if not root or not Path(root).exists():
        raise ConfigError(f"data root {root!r} not found (set data.root)")
    return open_reader(root)


def build_loader(cfg: TrainConfig, ctx: Context) -> tuple[ClipDataset, ResumableSampler, dict]:
    """Training dataset, its resumable distributed sampler and the DataLoader arguments."""
    dataset = ClipDataset(
        open_data(cfg.data.root),
        split_items(cfg, "train"),
        sampling_config(cfg),
        train=True,
        seed=cfg.run.seed,
    )
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


def micro_batches(dataset: ClipDataset, sampler: ResumableSampler, loader_kw: dict, pos: dict):
    """Endless micro-batches; `pos` ({"epoch", "offset"}) is updated as batches are consumed.

    `offset` counts this rank's samples already used in `epoch`, so a checkpoint of `pos`
    restarts the stream at the same sample.
    """
    while True:
        dataset.set_epoch(pos["epoch"])
        sampler.set_epoch(pos["epoch"])
        sampler.start = pos["offset"]
        got = False
        for batch in DataLoader(dataset, **loader_kw):
            got = True
            pos["offset"] += len(batch["label"])
            yield batch
        if not got and pos["offset"] == 0:
            raise ConfigError("training list is smaller than one micro-batch per rank")
        pos["epoch"], pos["offset"] = pos["epoch"] + 1, 0


# --------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """Create the network of the [model] section through `strnet.models.create_model`."""
    m, d = cfg.model, cfg.data
    if m.name not in MODEL_NAMES:
        raise ConfigError(f"unknown model.name {m.name!r}; known: {', '.join(MODEL_NAMES)}")
    kw = dict(num_classes=m.num_classes, width=m.width, bn_sub_batch=m.bn_sub_batch or None)
    if is_two_stream(m.name):
        if not (d.use_rgb and d.use_flow):
            raise ConfigError(f"{m.name} needs data.use_rgb and data.use_flow")
        kw.update(flow_stack=d.flow_stack)
    else:
        if d.use_rgb == d.use_flow:
            raise ConfigError("a single-stream model needs data.use_rgb or data.use_flow, not both")
        kw.update(in_channels=m.in_channels or (3 if d.use_rgb else 2 * d.flow_stack))
    return create_model(m.name, **kw)


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


def clip_loss(scores: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over streams of the mean cross-entropy over every (clip, chunk) position.

    The paper keeps one loss per input chunk and per stream (Sec. 3.4, no joint classifier).
    """
    total = 0.0
    for s in scores.values():
        b, t, k = s.shape
        total = total + F.cross_entropy(s.float().reshape(b * t, k), labels.repeat_interleave(t))
    return total


def fused_scores(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Video scores (B, K): average over positions, then over streams, before softmax."""
    return torch.stack([s.float().mean(1) for s in scores.values()]).mean(0)


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


def tensorboard_writer(out: Path):
    """A SummaryWriter when tensorboard is installed, else None (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard missing or broken: skip it
        return None
    return SummaryWriter(str(out / "tb"))


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Loss and training-accuracy curves of a run as a PNG; None if nothing was logged."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["loss"] for r in rows])
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax2.plot(steps, [r["acc"] for r in rows])
    ax2.set(xlabel="step", ylabel="accuracy", title="training accuracy (fused)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


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


def checkpoint_state(model, optimizer, step: int, pos: dict, cfg: TrainConfig) -> dict:
    """Everything `--resume` needs, as weights_only-loadable values."""
    raw = model.module if hasattr(model, "module") else model
    return {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "schedule": {"lrs": list(cfg.optim.lrs), "iterations": list(cfg.optim.iterations)},
        "sampler": dict(pos),
        "rng": rng_state(),
        "config": to_dict(cfg),
    }


def resume_from(path: Path, model, optimizer) -> tuple[int, dict]:
    """Restore model, optimizer and RNG states; return (step, sampler position)."""
    ckpt = load_checkpoint(path)
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"]), dict(ckpt["sampler"])


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


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or resume) one training phase; return a summary with the final step and metrics.

    Writes `config.json`, `metrics.jsonl`, `checkpoint.pt` and `curves.png` to `cfg.run.out`.
    """
    # config -> device / DDP
    ctx = setup_device(cfg.run.device)
    out = Path(cfg.run.out)
    o = cfg.optim
    if o.batch_size % (o.micro_batch * ctx.world_size):
        raise ConfigError("optim.batch_size must be a multiple of micro_batch x world size")
    accum = o.batch_size // (o.micro_batch * ctx.world_size)
    total = sum(o.iterations) if cfg.run.max_steps <= 0 else cfg.run.max_steps
    torch.manual_seed(cfg.run.seed)
    cuda = ctx.device.type == "cuda"

    # data
    dataset, sampler, loader_kw = build_loader(cfg, ctx)

    # model
    model = build_model(cfg)
    two_stream = is_two_stream(cfg.model.name)
    notes = [] if resume else initialise(model, cfg)
    model.to(ctx.device)
    if cuda:
        to_channels_last(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=o.lrs[0], momentum=o.momentum, weight_decay=o.weight_decay
    )
    step, pos = 0, {"epoch": 0, "offset": 0}
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"nothing to resume: {str(ckpt_path)!r} not found")
        step, pos = resume_from(ckpt_path, model, optimizer)
    if cfg.run.sync_bn and ctx.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if cuda else None
        )
    writer = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1) + "\n")
        writer = tensorboard_writer(out)
        for line in notes:
            print(line)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    # loop
    from tqdm import tqdm

    bar = tqdm(
        total=total, initial=step, disable=not (ctx.is_main and cfg.run.progress), desc="train"
    )
    stream = micro_batches(dataset, sampler, loader_kw, pos)
    last: dict = {}
    model.train()
    while step < total:
        lr = lr_at(step, o.lrs, o.iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0, data_s = time.perf_counter(), 0.0
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        for micro in range(accum):
            t_data = time.perf_counter()
            batch = next(stream)
            data_s += time.perf_counter() - t_data
            labels = batch["label"].to(ctx.device)
            sync = micro == accum - 1 or ctx.world_size == 1
            with nullcontext() if sync else model.no_sync(), autocast:
                scores = forward_scores(model, batch, two_stream, ctx.device)
                loss = clip_loss(scores, labels)
            (loss / accum).backward()
            pred = fused_scores(scores).argmax(1)
            stats += torch.tensor([loss.item(), (pred == labels).sum().item(), len(labels)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if ctx.world_size > 1:
            dist.all_reduce(stats)
        loss_mean = stats[0].item() / (accum * ctx.world_size)
        if not math.isfinite(loss_mean):
            raise RuntimeError(f"loss is {loss_mean} at step {step}; lower optim.lrs")
        step_s = time.perf_counter() - t0
        last = {
            "step": step,
            "lr": lr,
            "loss": loss_mean,
            "acc": stats[1].item() / stats[2].item(),
            "samples_per_s": stats[2].item() / step_s,
            "step_s": step_s,
            "data_s": data_s,
            "epoch": pos["epoch"],
        }
        bar.set_postfix(loss=f"{loss_mean:.3f}", acc=f"{last['acc']:.2f}")
        if ctx.is_main and (step % cfg.run.log_every == 0 or step == total):
            log_metrics(out, last, writer)
        if step == total and cfg.run.precise_bn > 0:
            batches = micro_batches(dataset, sampler, loader_kw, dict(pos))
            recompute_bn_statistics(model, batches, cfg.run.precise_bn, two_stream, ctx, autocast)
        if step % cfg.run.ckpt_every == 0 or step == total:
            if ctx.is_main:
                save_checkpoint(ckpt_path, checkpoint_state(model, optimizer, step, pos, cfg))
            if ctx.world_size > 1:
                dist.barrier()
    bar.close()

    # wrap up
    if ctx.is_main:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
        if writer is not None:
            writer.close()
    return {"step": step, "out": str(out), "weights_digest": weights_digest(model), **last}


# --------------------------------------------------------------------------- CLI
@click.command("train")
@click.argument("config")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set optim.lrs=[0.01,0.001]; repeatable.",
)
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/checkpoint.pt.")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder (overrides run.out).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_command(config: str, overrides: tuple, resume: bool, out: str | None, quiet: bool):
    """Train one phase: CONFIG is a TOML file or a shipped phase (motion, appearance,
    st-resnet, st-resnet-star). Under torchrun every rank runs this command."""
    extra = list(overrides) + ([f"run.out={json.dumps(out)}"] if out else [])
    extra += ["run.progress=false"] if quiet else []
    try:
        cfg = load_config(config, extra)
        summary = train(cfg, resume=resume)
    except (ConfigError, CheckpointError, WeightsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0]) if exc.args else "missing key") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(summary))
