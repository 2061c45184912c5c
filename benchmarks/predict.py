"""Seconds per video of `strnet predict`, split into decode / flow / network.

Untrained checkpoints of the paper's sizes are written to a temporary folder (weights do not
change the time); the videos are the sample clips in ../shared/data/videos unless given. Each
video's times are those `strnet.predict.Predictor` records (decode runs one video ahead in its
own thread, so the wall time per video is about max(decode, flow + network), not their sum).

    python benchmarks/predict.py                                   # two-stream, paper protocol
    python benchmarks/predict.py --model st-resnet --protocol center
    python benchmarks/predict.py --device cuda --json-out gpu.json # on a GPU
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from flowprep.manifest import find_videos
from strnet.config import load_config, to_dict
from strnet.predict import Predictor, predict
from strnet.runtime import build_model

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
MODELS = {  # --model -> the phase configs of its checkpoints (fused when several)
    "two-stream": ("appearance", "motion"),
    "st-resnet": ("st-resnet",),
    "appearance": ("appearance",),
    "motion": ("motion",),
}


def write_checkpoint(folder: Path, phase: str, width: int, classes: int) -> Path:
    """An untrained strnet checkpoint of `phase` (what `strnet predict` loads)."""
    cfg = load_config(phase, [f"model.width={width}", f"model.num_classes={classes}",
                              "model.init=''", "model.init_appearance=''",
                              "model.init_motion=''"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    path = folder / phase / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    names = [f"class{i:03d}" for i in range(classes)]
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "classes": names}, path)
    return path


@click.command()
@click.argument("videos", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--model", type=click.Choice(list(MODELS)), default="two-stream", show_default=True)
@click.option("--width", type=int, default=64, show_default=True, help="conv1 width (64 = paper).")
@click.option("--protocol", type=click.Choice(["paper", "center"]), default="paper",
              show_default=True)  # fmt: skip
@click.option("--test-chunks", type=int, default=25, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)  # fmt: skip
@click.option("--flow-compile", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True)  # fmt: skip
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="One untimed chunk per video first (compiles flow per size).")  # fmt: skip
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write results.")
def main(videos, model, width, protocol, test_chunks, device, flow_compile, warmup, json_out):
    """Print seconds per video (decode / flow / network) of `strnet predict` on VIDEOS."""
    paths = list(videos) or [SAMPLES / rel for rel in find_videos(SAMPLES)]
    tmp = tempfile.TemporaryDirectory()
    ckpts = [write_checkpoint(Path(tmp.name), p, width, 101) for p in MODELS[model]]
    predictor = Predictor(
        ckpts, protocol=protocol, test_chunks=test_chunks, device=device,
        flow_compile={"on": True, "off": False}.get(flow_compile, "auto"),
    )  # fmt: skip
    if warmup:  # every frame size once: compiles flow kernels, warms the caches
        cheap = Predictor(ckpts, protocol="center", test_chunks=1, device=device,
                          flow_compile=predictor.flow_compile)  # fmt: skip
        predict(cheap, paths)
    start = time.perf_counter()
    results = predict(predictor, paths)
    wall = time.perf_counter() - start
    rows = []
    click.echo(f"{'video':24s} {'frames':>6s} {'decode s':>9s} {'flow s':>8s} {'network s':>10s}")
    for r in results:
        if r.status != "done":
            click.echo(f"{Path(r.video).name:24s} failed: {r.reason}")
            continue
        row = {"video": Path(r.video).name, "frames": r.num_frames, **r.seconds}
        rows.append(row)
        click.echo(
            f"{row['video']:24s} {row['frames']:6d} {row['decode']:9.2f} {row['flow']:8.2f} "
            f"{row['network']:10.2f}"
        )
    mean = {k: statistics.mean(r[k] for r in rows) for k in ("decode", "flow", "network")}
    click.echo(
        f"{'mean per video':24s} {'':>6s} {mean['decode']:9.2f} {mean['flow']:8.2f} "
        f"{mean['network']:10.2f}   wall {wall / max(len(results), 1):.2f} s/video "
        f"({len(rows)} videos, {predictor.ctx.device}, {torch.get_num_threads()} threads)"
    )
    if json_out:
        settings = dict(model=model, width=width, protocol=protocol, test_chunks=test_chunks,
                        device=str(predictor.ctx.device), flow_compile=flow_compile,
                        threads=torch.get_num_threads())  # fmt: skip
        Path(json_out).write_text(json.dumps(
            {"settings": settings, "videos": rows, "mean": mean,
             "wall_per_video": wall / max(len(results), 1)}, indent=1))  # fmt: skip
    tmp.cleanup()


if __name__ == "__main__":
    main()
