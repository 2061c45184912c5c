"""Training throughput per phase of Table 2: data loader alone vs the full training step.

If the loader alone delivers fewer samples/s than the full step consumes, the run is data-bound.
Without --data a synthetic frame folder (short side 256, like `flowprep extract`) is generated.
Phases start from random weights, so fusion phases train their towers too (freeze_towers off).

    python benchmarks/train.py --width 16 --crop-size 112 --steps 4      # quick CPU check
    python benchmarks/train.py --width 64 --crop-size 224 --device cuda  # the paper's sizes
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from strnet.config import PHASES, load_config
from strnet.train import Context, build_loader, train


def synthetic_folder(root: Path, videos: int, frames: int, height: int, width: int) -> Path:
    """Frame folders in flowprep's layout with random JPEG content, 2 classes, split lists."""
    rng = np.random.default_rng(0)
    lines = []
    for v in range(videos):
        vid, d = f"c{v % 2}/v_{v:03d}", root / f"c{v % 2}/v_{v:03d}"
        d.mkdir(parents=True)
        for k in range(frames):
            img = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), np.uint8), (0, 0), 3)
            cv2.imwrite(str(d / f"img_{k + 1:05d}.jpg"), img)
            if k < frames - 1:
                for c in "xy":
                    flow = np.clip(rng.normal(128, 8, (height, width)), 0, 255).astype(np.uint8)
                    cv2.imwrite(str(d / f"flow_{c}_{k + 1:05d}.jpg"), flow)
        meta = dict(
            video_id=vid,
            label_index=v % 2,
            label=f"c{v % 2}",
            width=width,
            height=height,
            num_frames=frames,
            num_flows=frames - 1,
            index_base=1,
            flow_bound=20.0,
            flow_format="jpeg",
            settings={},
            settings_hash="b",
        )
        (d / "meta.json").write_text(json.dumps(meta))
        (d / ".done").write_text(json.dumps({"settings_hash": "b"}))
        lines.append(f"{vid} {frames} {v % 2}")
    (root / "train_split1.txt").write_text("\n".join(lines) + "\n")
    return root


def loader_rate(cfg, batches: int) -> float:
    """Samples/s of the DataLoader alone (read + sample + augment) over epochs, warm-up excluded."""
    dataset, sampler, kw = build_loader(cfg, Context(torch.device("cpu")))
    n, epoch, t0 = 0, 0, None
    while n < batches * cfg.optim.micro_batch:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in DataLoader(dataset, **kw):
            if t0 is None:
                t0 = time.perf_counter()  # the first batch pays for worker start-up
                continue
            n += len(batch["label"])
        epoch += 1
    return n / (time.perf_counter() - t0)


def step_rate(cfg, steps: int) -> dict:
    """Median step time and samples/s of full training steps (first step excluded as warm-up)."""
    cfg.run.max_steps, cfg.run.log_every, cfg.run.ckpt_every = steps + 1, 1, 10**9
    train(cfg)
    rows = [json.loads(x) for x in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:]
    return {
        "step_s": statistics.median(r["step_s"] for r in rows),
        "data_s": statistics.median(r["data_s"] for r in rows),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
    }


@click.command()
@click.option("--data", type=click.Path(exists=True), default=None, help="Frame folder root.")
@click.option("--phases", default=",".join(PHASES), show_default=True,
              help="Comma list; PHASE@MODEL runs a phase with another model.name, e.g. "
              "st-resnet@two_stream_resnet50,fusion,fusion-3d.")  # fmt: skip
@click.option("--width", type=int, default=16, show_default=True, help="Model width (64=paper).")
@click.option("--crop-size", type=int, default=112, show_default=True, help="Input side.")
@click.option("--micro-batch", type=int, default=4, show_default=True, help="Clips per step.")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per phase.")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader workers.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Write results.")
def main(data, phases, width, crop_size, micro_batch, steps, workers, device, json_out):
    """Print samples/s of the loader alone and of full steps for each training phase."""
    tmp = tempfile.TemporaryDirectory()
    root = data or str(synthetic_folder(Path(tmp.name) / "data", 24, 40, 256, 340))
    results = []
    for item in phases.split(","):
        phase, _, model = item.partition("@")
        out = Path(tmp.name) / item.replace("@", "_")
        cfg = load_config(phase, [*([f"model.name={json.dumps(model)}"] if model else []),
            f"data.root={json.dumps(root)}", f"run.out={json.dumps(str(out))}",
            f"data.crop_size={crop_size}", f"data.num_workers={workers}", f"model.width={width}",
            "model.num_classes=2", "model.init=''",
            "model.init_appearance=''", "model.init_motion=''", f"optim.batch_size={micro_batch}",
            f"optim.micro_batch={micro_batch}", "model.bn_sub_batch=0", "run.progress=false",
            f"run.device={json.dumps(device)}",
            *(["model.freeze_towers=false"] if "fusion" in item else []),  # random towers
        ])  # fmt: skip
        row = {"phase": item, "loader_samples_per_s": loader_rate(cfg, steps * 4)}
        row.update(step_rate(cfg, steps))
        row["data_bound"] = row["loader_samples_per_s"] < row["samples_per_s"]
        results.append(row)
        click.echo(
            f"{item:15s} loader {row['loader_samples_per_s']:8.1f} clips/s   step "
            f"{row['step_s'] * 1000:8.1f} ms ({row['samples_per_s']:6.1f} clips/s, data wait "
            f"{row['data_s'] * 1000:6.1f} ms)"
        )
    meta = dict(
        device=device,
        cuda=torch.cuda.is_available(),
        width=width,
        crop_size=crop_size,
        micro_batch=micro_batch,
        threads=torch.get_num_threads(),
    )
    if json_out:
        Path(json_out).write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
