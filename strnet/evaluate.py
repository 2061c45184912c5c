"""Video-level evaluation with the paper's test protocol (Sec. 3.4) or a cheaper centre crop.

Paper protocol: 25 chunks sampled evenly and their horizontal flips, fully convolutional on whole
frames (short side 256), scores averaged over all positions before softmax, streams fused by
averaging. Centre protocol: the same chunks, one `crop_size` centre crop, no flips.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch
from torch.utils.data import DataLoader

from strnet.checkpoint import CheckpointError, load_checkpoint
from strnet.config import ConfigError, config_from_dict
from strnet.data import ClipDataset, hflip_normalized_flow
from strnet.train import (
    build_model,
    forward_scores,
    is_two_stream,
    open_data,
    sampling_config,
    setup_device,
    split_items,
)
from strnet.weights import WeightsError, strip_prefixes

PROTOCOLS = ("paper", "center")


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


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows of (N, K) `scores` whose label is among the k highest."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def summarize(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, top-5, per-class accuracy and confusion matrix of video scores (N, K)."""
    pred = scores.argmax(1)
    cm = confusion_matrix(pred, labels, scores.shape[1])
    support = cm.sum(1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "per_class": [None if np.isnan(a) else float(a) for a in per_class],
        "mean_class_accuracy": float(np.nanmean(per_class)) if support.any() else 0.0,
        "confusion": cm.tolist(),
        "num_videos": int(len(labels)),
    }


def plot_confusion(cm: np.ndarray, png_path: Path, title: str) -> Path:
    """Row-normalized confusion matrix as a PNG image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def stream_scores(
    checkpoint: str | Path,
    data_root: str,
    split: int,
    *,
    protocol: str,
    test_chunks: int,
    device: str,
    test_list: str,
    num_workers: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Video labels (N,) and per-stream video scores (N, K) of one checkpoint on a test list."""
    ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{str(checkpoint)!r} is not a strnet training checkpoint")
    cfg = config_from_dict(ckpt["config"])
    cfg.data.root, cfg.data.split, cfg.data.test_list = data_root, split, test_list
    cfg.data.test_chunks = test_chunks
    cfg.data.crop = "none" if protocol == "paper" else "center"
    ctx = setup_device(device)
    model = build_model(cfg)
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    model.to(ctx.device).eval()
    two_stream = is_two_stream(cfg.model.name)
    cuda = ctx.device.type == "cuda"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )
    items = split_items(cfg, "test")
    dataset = ClipDataset(open_data(data_root), items, sampling_config(cfg), train=False)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    per_stream: dict[str, list] = {}
    for sample in loader:
        views = video_views(sample, flips=protocol == "paper")
        for stream, s in video_scores(model, views, two_stream, ctx.device, autocast).items():
            per_stream.setdefault(stream, []).append(s.numpy())
    labels = np.array([label for _, label in items], dtype=np.int64)
    return labels, {k: np.stack(v) for k, v in per_stream.items()}


def evaluate(
    checkpoint: str | Path | list[str | Path],
    data_root: str,
    split: int,
    *,
    protocol: str = "paper",
    test_chunks: int = 25,
    out: str | Path | None = None,
    device: str = "auto",
    test_list: str = "",
    num_workers: int = 0,
) -> dict:
    """Evaluate trainer checkpoint(s) on the test list of `split`; return the metrics dict.

    Several checkpoints are fused like the streams of one: their non-softmaxed video scores are
    averaged (Table 3's two-stream column from the appearance and motion phases). With `out`,
    writes `eval_split<N>.json` and `confusion_split<N>.png` there.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    paths = list(checkpoint) if isinstance(checkpoint, list | tuple) else [checkpoint]
    labels, streams = None, {}
    for path in paths:
        got, scores = stream_scores(
            path, data_root, split, protocol=protocol, test_chunks=test_chunks, device=device,
            test_list=test_list, num_workers=num_workers,
        )  # fmt: skip
        labels = got
        for name, value in scores.items():
            key = name if name not in streams else f"{name}:{path}"
            streams[key] = value
    fused = np.mean(np.stack(list(streams.values())), axis=0)
    result = {"split": split, "protocol": protocol, "checkpoint": ", ".join(map(str, paths))}
    result.update(summarize(fused, labels))
    result["streams"] = {k: {"top1": topk_accuracy(v, labels, 1)} for k, v in streams.items()}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"eval_split{split}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot_confusion(
            np.array(result["confusion"]),
            out / f"confusion_split{split}.png",
            f"split {split}: top-1 {result['top1']:.3f}",
        )
    return result


def mean_over_splits(results: list[dict]) -> dict:
    """Mean top-1/top-5 over splits (the paper reports the 3-split mean)."""
    return {
        "splits": [r["split"] for r in results],
        "top1": float(np.mean([r["top1"] for r in results])),
        "top5": float(np.mean([r["top5"] for r in results])),
    }


@click.command("eval")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--split",
    "splits",
    type=int,
    multiple=True,
    required=True,
    help="Split N of test_split<N>.txt; one per CHECKPOINT, repeatable.",
)
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(exists=True),
    help="Frame-folder root or shard directory.",
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="paper",
    show_default=True,
    help="paper: 25 chunks + flips on whole frames; center: one centre crop.",
)
@click.option(
    "--test-chunks",
    type=int,
    default=25,
    show_default=True,
    help="Chunks sampled evenly per video.",
)
@click.option("--test-list", default="", help="List file instead of DATA/test_split<N>.txt.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for eval JSON and confusion-matrix PNGs.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to run the model.",
)
@click.option(
    "-j", "--jobs", type=int, default=0, show_default=True, help="DataLoader worker processes."
)
@click.option(
    "--fuse",
    is_flag=True,
    help="Fuse all CHECKPOINTS (e.g. appearance + motion phases) on one --split by averaging "
    "their scores before softmax.",
)
def eval_command(
    checkpoints, splits, data_root, protocol, test_chunks, test_list, out, device, jobs, fuse
):
    """Evaluate CHECKPOINT(s) video by video; with three splits also print the mean."""
    if fuse and len(splits) != 1:
        raise click.UsageError("--fuse evaluates all CHECKPOINTS together: give one --split")
    if not fuse and len(checkpoints) != len(splits):
        raise click.UsageError("give one --split per CHECKPOINT")
    runs = [(list(checkpoints), splits[0])] if fuse else list(zip(checkpoints, splits, strict=True))
    results = []
    try:
        for ckpt, split in runs:
            r = evaluate(
                ckpt,
                data_root,
                split,
                protocol=protocol,
                test_chunks=test_chunks,
                out=out,
                device=device,
                test_list=test_list,
                num_workers=jobs,
            )
            results.append(r)
            click.echo(
                f"split {split}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  "
                f"mean class {r['mean_class_accuracy']:.4f}  ({r['num_videos']} videos)"
            )
    except (ConfigError, WeightsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0]) if exc.args else "missing key") from None
    if len(results) > 1:
        m = mean_over_splits(results)
        click.echo(f"mean over splits {m['splits']}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}")
