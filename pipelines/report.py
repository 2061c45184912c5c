"""The table of a pipeline run beside the paper's: table.md, table.csv and table.png.

Reads the metrics JSON and per-video scores that `strnet eval` left for every column; for a
synthetic dataset also the accuracy per class group (appearance, motion, wmw, order).
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path

import numpy as np

from flowprep.atomic import write_bytes_atomic, write_text_atomic
from pipelines.config import PipelineConfig, PipelineError
from pipelines.plan import result_file, scores_file


def column_source(col) -> str:
    """The eval or fuse stage whose outputs hold a column's numbers."""
    return col.key if len(col.phases) > 1 else col.phases[0]


def video_scores(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels, fused video scores (N, K), class names) of a saved scores file.

    Streams are averaged before softmax, as `strnet eval` fuses them (Sec. 3.4).
    """
    with np.load(path, allow_pickle=False) as z:
        streams = [z[k] for k in z.files if k.startswith("scores_")]
        if not streams:
            raise PipelineError(f"{path}: no scores_* arrays")
        return z["labels"], np.mean(np.stack(streams), axis=0), [str(c) for c in z["class_names"]]


def group_accuracy(labels: np.ndarray, scores: np.ndarray, classes: list[int]) -> float:
    """Accuracy on the videos of `classes` when choosing among those classes only.

    Chance is 1 / len(classes): 50 % for a pair, whatever the other classes do.
    """
    mask = np.isin(labels, classes)
    if not mask.any():
        return float("nan")
    picked = np.array(classes)[scores[mask][:, classes].argmax(1)]
    return float((picked == labels[mask]).mean())


def read_groups(path: Path) -> dict[str, list[str]]:
    """kind -> class names from a synthetic set's classes.json ({} when there is none)."""
    if not path.is_file():
        return {}
    groups: dict[str, list[str]] = {}
    for c in json.loads(path.read_text())["classes"]:
        groups.setdefault(str(c["kind"]), []).append(str(c["name"]))
    return groups


def collect(cfg: PipelineConfig, run: Path, classes_json: dict[str, Path]) -> dict:
    """All numbers of the table: top-1 per dataset, split and column; group accuracies."""
    top1: dict = {}
    groups: dict = {}
    for ds in cfg.datasets:
        kinds = read_groups(classes_json.get(ds, Path("/nonexistent")))
        for split in cfg.splits:
            for col in cfg.columns:
                src = column_source(col)
                result = json.loads((run / result_file(ds, split, src)).read_text())
                top1[(ds, split, col.key)] = 100.0 * float(result["top1"])
                if not kinds:
                    continue
                labels, scores, names = video_scores(run / scores_file(ds, split, src))
                for kind, members in kinds.items():
                    idx = [names.index(m) for m in members if m in names]
                    acc = group_accuracy(labels, scores, idx)
                    groups[(ds, split, kind, col.key)] = 100.0 * acc
    return {"top1": top1, "groups": groups}


def mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def fmt(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.1f}"


def markdown(cfg: PipelineConfig, numbers: dict, groups_of: dict, stamp: str) -> str:
    """table.md: ours per split and mean, the paper's row beside, then class groups."""
    cols = cfg.columns
    head = "| Dataset | Split | " + " | ".join(c.name for c in cols) + " |"
    rule = "|---|---|" + "---:|" * len(cols)
    lines = [f"# {cfg.title}", "", f"{cfg.paper}", "", stamp, "", head, rule]
    top1 = numbers["top1"]
    for ds, spec in cfg.datasets.items():
        for split in cfg.splits:
            row = [fmt(top1[(ds, split, c.key)]) for c in cols]
            lines.append(f"| {ds} (ours) | {split} | " + " | ".join(row) + " |")
        if len(cfg.splits) > 1:
            row = [fmt(mean([top1[(ds, s, c.key)] for s in cfg.splits])) for c in cols]
            lines.append(f"| {ds} (ours) | mean | " + " | ".join(row) + " |")
        paper_row = spec.paper_row or ds
        row = [fmt(c.paper.get(paper_row)) for c in cols]
        lines.append(f"| {paper_row} (paper) | | " + " | ".join(row) + " |")
    for ds, kinds in groups_of.items():
        if not kinds:
            continue
        lines += [
            "",
            f"## {ds}: accuracy within each class group (chance 50 % per pair), "
            f"mean over splits {cfg.splits}",
            "",
            "| Group | Classes | " + " | ".join(c.name for c in cols) + " |",
            "|---|---|" + "---:|" * len(cols),
        ]
        for kind, members in kinds.items():
            row = [
                fmt(mean([numbers["groups"][(ds, s, kind, c.key)] for s in cfg.splits]))
                for c in cols
            ]
            lines.append(f"| {kind} | {', '.join(members)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def csv_text(cfg: PipelineConfig, numbers: dict) -> str:
    """table.csv: one row per number, ours and the paper's, for scripts and spreadsheets."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["dataset", "split", "group", "column", "top1_percent", "paper_top1_percent"])
    for (ds, split, key), value in numbers["top1"].items():
        col = next(c for c in cfg.columns if c.key == key)
        paper = col.paper.get(cfg.datasets[ds].paper_row or ds)
        w.writerow([ds, split, "all", key, f"{value:.2f}", "" if paper is None else paper])
    for (ds, split, kind, key), value in numbers["groups"].items():
        w.writerow([ds, split, kind, key, f"{value:.2f}", ""])
    return out.getvalue()


def chart(cfg: PipelineConfig, numbers: dict, groups_of: dict) -> bytes:
    """table.png: ours (mean over splits) beside the paper per column; class groups if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ds, None) for ds in cfg.datasets] + [(ds, k) for ds, k in groups_of.items() if k]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    x = np.arange(len(cfg.columns))
    for ax, (ds, kinds) in zip(axes[0], panels, strict=True):
        if kinds is None:
            ours = [
                mean([numbers["top1"][(ds, s, c.key)] for s in cfg.splits]) for c in cfg.columns
            ]
            row = cfg.datasets[ds].paper_row or ds
            paper = [c.paper.get(row, np.nan) for c in cfg.columns]
            ax.bar(x - 0.2, ours, 0.4, label=f"{ds} (ours)")
            ax.bar(x + 0.2, paper, 0.4, label=f"{row} (paper)")
            ax.set_title(f"{ds}: top-1 %")
        else:
            width = 0.8 / len(kinds)
            for i, kind in enumerate(kinds):
                vals = [
                    mean([numbers["groups"][(ds, s, kind, c.key)] for s in cfg.splits])
                    for c in cfg.columns
                ]
                ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=kind)
            ax.axhline(50, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{ds}: accuracy within class pairs %")
        ax.set_xticks(x, [c.name for c in cfg.columns], rotation=20, ha="right")
        ax.set_ylim(0, 118)  # a band above 100 % for the legend, so it covers no bar
        ax.set_yticks(range(0, 101, 20))
        ax.legend(fontsize=8, ncol=4, loc="upper center", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_table(cfg: PipelineConfig, run: Path, classes_json: dict[str, Path]) -> Path:
    """Write RUN/table.md, table.csv and table.png atomically; return table.md's path."""
    run = Path(run)
    numbers = collect(cfg, run, classes_json)
    groups_of = {ds: read_groups(classes_json.get(ds, Path("/nonexistent"))) for ds in cfg.datasets}
    stamp = (
        f"Top-1 accuracy in %, protocol `{cfg.evaluation.protocol}` "
        f"({cfg.evaluation.test_chunks} chunks); written {time.strftime('%Y-%m-%d')} on "
        f"{platform.machine()} {platform.system()}."
    )
    write_text_atomic(run / "table.md", markdown(cfg, numbers, groups_of, stamp))
    write_text_atomic(run / "table.csv", csv_text(cfg, numbers))
    write_bytes_atomic(run / "table.png", chart(cfg, numbers, groups_of))
    return run / "table.md"
