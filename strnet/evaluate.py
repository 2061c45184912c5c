"""Video-level evaluation with the paper's test protocol (Sec. 3.4) or a cheaper centre crop.

Paper protocol: 25 chunks sampled evenly and their horizontal flips, fully convolutional on whole
frames (short side 256), scores averaged over all positions before softmax, streams fused by
averaging. Centre protocol: the same chunks, one `crop_size` centre crop, no flips. Every
evaluation can save its per-video scores (`strnet.scores`), and saved scores fuse later without
data or model, exactly as fusing the checkpoints would. A 3D ResNet (Hara et al. 2017, Sec. 3.2.2)
is evaluated on non-overlapping 16-frame windows, centre-cropped, its class probabilities
averaged (`strnet.clips3d`); its saved scores are the log of those averages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from strnet.config import ConfigError
from strnet.models import is_two_stream
from strnet.resolve import class_names
from strnet.runtime import (  # noqa: F401 - video_scores/views re-exported for callers
    PROTOCOLS,
    list_line,
    list_path,
    load_trained,
    open_data,
    score_videos,
    setup_device,
    split_items,
    test_loader,
    topk_accuracy,
    video_scores,
    video_views,
)
from strnet.scores import (
    VideoScores,
    check_name,
    combine,
    default_name,
    load_scores,
    output_paths,
    save_scores,
)


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def summarize(scores: np.ndarray, labels: np.ndarray, names: list[str] | None = None) -> dict:
    """Top-1, top-5, per-class accuracy and confusion matrix of video scores (N, K).

    `per_class` is a list by class index, or {class name: accuracy} when `names` are given;
    classes without test videos have None.
    """
    pred = scores.argmax(1)
    cm = confusion_matrix(pred, labels, scores.shape[1])
    support = cm.sum(1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    accs = [None if np.isnan(a) else float(a) for a in per_class]
    return {
        "top1": topk_accuracy(scores, labels, 1),
        "top5": topk_accuracy(scores, labels, 5),
        "per_class": dict(zip(names, accs, strict=True)) if names is not None else accs,
        "mean_class_accuracy": float(np.nanmean(per_class)) if support.any() else 0.0,
        "confusion": cm.tolist(),
        "num_videos": int(len(labels)),
    }


def plot_confusion(
    cm: np.ndarray, png_path: Path, title: str, names: list[str] | None = None
) -> Path:
    """Row-normalized confusion matrix as a PNG image, axes labelled with the class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 6 if names is None else min(30, max(6, 0.18 * len(names) + 3))
    fig, ax = plt.subplots(figsize=(size, size * 5 / 6))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if names is not None:
        ticks = np.arange(len(names))
        fontsize = max(3, min(9, 300 / max(len(names), 1)))
        ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, names, fontsize=fontsize)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def checkpoint_scores(
    checkpoint: str | Path,
    data_root: str,
    split: int,
    *,
    protocol: str,
    test_chunks: int,
    device: str,
    test_list: str,
    num_workers: int,
    on_start: Callable[[int], None] | None = None,
    on_video: Callable[[], None] | None = None,
) -> VideoScores:
    """Per-stream video scores of one training checkpoint on the test list of `split`.

    Class names are the checkpoint's (older checkpoints: from the videos' metadata).
    `on_start(n)` is told the number of test videos, `on_video()` each one scored (progress).
    """
    trained = load_trained(checkpoint)
    cfg = trained.cfg
    cfg.data.root, cfg.data.split, cfg.data.test_list = data_root, split, test_list
    cfg.data.test_chunks = test_chunks
    items = split_items(cfg, "test")
    k = cfg.model.num_classes
    bad = [(vid, label) for vid, label in items if not 0 <= label < k]
    if bad:
        vid, label = bad[0]
        where = list_line(list_path(cfg, "test"), vid)
        raise ConfigError(
            f"{where}: label {label} of {vid!r} is out of range: '{checkpoint}' has {k} classes "
            f"(labels 0-{k - 1})"
        )
    ctx = setup_device(device)
    reader = open_data(data_root)
    loader = test_loader(cfg, reader, items, protocol=protocol, num_workers=num_workers)
    if on_start is not None:
        on_start(len(items))
    streams = score_videos(
        trained.model.to(ctx.device), loader, two_stream=is_two_stream(cfg.model.name),
        device=ctx.device, flips=protocol == "paper", on_video=on_video,
    )  # fmt: skip
    names = trained.classes or class_names(reader, items, k)
    labels = np.array([label for _, label in items], dtype=np.int64)
    return VideoScores([vid for vid, _ in items], labels, names, streams, protocol)


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
    s = checkpoint_scores(
        checkpoint, data_root, split, protocol=protocol, test_chunks=test_chunks, device=device,
        test_list=test_list, num_workers=num_workers,
    )  # fmt: skip
    return s.labels, s.streams


def source_scores(path: str | Path, data_root: str | None, split: int, **kw) -> VideoScores:
    """Scores of one input: saved `.npz` scores as they are, a checkpoint evaluated on the data."""
    if str(path).endswith(".npz"):
        return load_scores(path)
    if not data_root:
        raise ConfigError(f"'{path}' is a checkpoint: evaluating it needs the data (--data)")
    return checkpoint_scores(path, data_root, split, **kw)


def evaluate(
    checkpoint: str | Path | list[str | Path],
    data_root: str | None,
    split: int,
    *,
    protocol: str = "paper",
    test_chunks: int = 25,
    out: str | Path | None = None,
    device: str = "auto",
    test_list: str = "",
    num_workers: int = 0,
    name: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_video: Callable[[], None] | None = None,
) -> dict:
    """Evaluate trainer checkpoint(s) or saved scores on the test list of `split`; the metrics.

    Several inputs are fused like the streams of one: their non-softmaxed video scores are
    averaged (Table 3's two-stream column from the appearance and motion phases); saved `.npz`
    scores fuse without data or model. With `out`, writes `<name>_split<N>.json`,
    `<name>_split<N>_confusion.png` and `<name>_split<N>_scores.npz` there (`strnet.scores`);
    `name` defaults to the inputs' run-folder names joined by `+`. `on_start(n)` and
    `on_video()` report each checkpoint's progress (`checkpoint_scores`).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    paths = list(checkpoint) if isinstance(checkpoint, list | tuple) else [checkpoint]
    name = check_name(name) if name else "+".join(default_name(p) for p in paths)
    kw = dict(protocol=protocol, test_chunks=test_chunks, device=device, test_list=test_list,
              num_workers=num_workers, on_start=on_start, on_video=on_video)  # fmt: skip
    scores = combine(
        [(default_name(p), str(p), source_scores(p, data_root, split, **kw)) for p in paths]
    )
    result = report(scores, split, name, ", ".join(map(str, paths)))
    if out is not None:
        write_outputs(out, split, result, scores)
    return result


def report(scores: VideoScores, split: int, name: str, inputs: str) -> dict:
    """The metrics dict of (fused) video scores: overall, per class (by name), per stream."""
    result = {"split": split, "protocol": scores.protocol, "checkpoint": inputs, "name": name}
    result.update(summarize(scores.fused(), scores.labels, scores.class_names))
    result["classes"] = list(scores.class_names)
    result["streams"] = {
        k: {"top1": topk_accuracy(v, scores.labels, 1)} for k, v in scores.streams.items()
    }
    return result


def write_outputs(out: str | Path, split: int, result: dict, scores: VideoScores) -> dict:
    """Write the metrics JSON, confusion PNG and scores npz of one evaluation; their paths."""
    paths = output_paths(out, result["name"], split)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    title = f"{result['name']} split {split}: top-1 {result['top1']:.3f}"
    plot_confusion(np.array(result["confusion"]), paths["confusion"], title, scores.class_names)
    save_scores(paths["scores"], scores)
    return paths


def mean_over_splits(results: list[dict]) -> dict:
    """Mean top-1/top-5 over splits (the paper reports the 3-split mean)."""
    return {
        "splits": [r["split"] for r in results],
        "top1": float(np.mean([r["top1"] for r in results])),
        "top5": float(np.mean([r["top5"] for r in results])),
    }
