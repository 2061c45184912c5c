"""Pictures of flow a person can check: the Middlebury colour wheel and `flowprep viz` panels.

A panel shows, side by side, the RGB frame, its flow in the colour wheel of Baker et al. (Middlebury
benchmark: hue = direction, saturation = magnitude) and the two quantized flow JPEGs as stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import cv2
import numpy as np

from flowprep.quantize import DEFAULT_BOUND, dequantize_flow

# Hue segments of the Middlebury wheel: red-yellow, yellow-green, green-cyan, cyan-blue,
# blue-magenta, magenta-red (Baker et al., "A Database and Evaluation Methodology for Optical
# Flow", IJCV 2011).
WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)


def color_wheel() -> np.ndarray:
    """(55, 3) float RGB colours in 0..1 around the Middlebury wheel, starting at red."""
    ry, yg, gc, cb, bm, mr = WHEEL_SEGMENTS
    ramps = []
    for n, (fixed, rising, falling) in zip(
        (ry, yg, gc, cb, bm, mr),
        ((0, 1, None), (1, None, 0), (1, 2, None), (2, None, 1), (2, 0, None), (0, None, 2)),
        strict=True,
    ):
        seg = np.zeros((n, 3))
        seg[:, fixed] = 1.0
        t = np.arange(n) / n
        if rising is not None:
            seg[:, rising] = t
        else:
            seg[:, falling] = 1.0 - t
        ramps.append(seg)
    return np.concatenate(ramps)


def flow_to_color(flow: np.ndarray, max_flow: float | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB picture of (H, W, 2) flow in the Middlebury colour wheel.

    Magnitudes are divided by `max_flow` (default: the largest in the image); beyond it colours
    are darkened, as in the Middlebury code. NaN is drawn black.
    """
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (H, W, 2), got {flow.shape}")
    bad = ~np.isfinite(flow).all(axis=-1)
    u, v = np.where(bad, 0, flow[..., 0]), np.where(bad, 0, flow[..., 1])
    rad = np.hypot(u, v)
    scale = float(max_flow) if max_flow else float(rad.max())
    rad = rad / max(scale, np.finfo(np.float32).eps)
    wheel = color_wheel()
    n = len(wheel)
    angle = np.arctan2(-v, -u) / np.pi  # -1..1
    fk = (angle + 1) / 2 * (n - 1)
    k0 = np.floor(fk).astype(int)
    k1 = (k0 + 1) % n
    f = (fk - k0)[..., None]
    col = (1 - f) * wheel[k0] + f * wheel[k1]
    inside = (rad <= 1)[..., None]
    col = np.where(inside, 1 - rad[..., None] * (1 - col), col * 0.75)
    col[bad] = 0
    return np.clip(np.rint(255 * col), 0, 255).astype(np.uint8)


def make_panel(
    frame: np.ndarray, qx: np.ndarray, qy: np.ndarray, bound: float, max_flow: float | None = None
) -> np.ndarray:
    """RGB (H, 4W, 3) strip: frame | colour-wheel flow | flow_x JPEG | flow_y JPEG.

    The flow is the dequantized one, i.e. what a network reading the JPEGs sees.
    """
    flow = np.stack((dequantize_flow(qx, bound), dequantize_flow(qy, bound)), axis=-1)
    gray = [np.repeat(q[..., None], 3, axis=-1) for q in (qx, qy)]
    return np.concatenate((frame, flow_to_color(flow, max_flow), *gray), axis=1)


def _read(path: Path, flags: int) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    return img


def write_panels(
    folder: Path,
    out: Path,
    *,
    limit: int | None = None,
    bound: float | None = None,
    max_flow: float | None = None,
) -> list[Path]:
    """Write viz_00001.png ... for the flow frames of one extracted video folder into `out`.

    The bound comes from meta.json when not given (else 20 px); returns the PNG paths.
    """
    meta_path = folder / "meta.json"
    if bound is None:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        bound = float(meta.get("flow_bound", DEFAULT_BOUND))
    names = sorted(p.name for p in folder.glob("flow_x_*.jpg"))
    if not names:
        raise ValueError(f"no flow_x_*.jpg in {folder}; extract with --modality flow or both")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names[:limit]:
        index = name[len("flow_x_") :]
        qx = _read(folder / name, cv2.IMREAD_GRAYSCALE)
        qy = _read(folder / f"flow_y_{index}", cv2.IMREAD_GRAYSCALE)
        img_path = folder / f"img_{index}"
        if img_path.is_file():
            frame = cv2.cvtColor(_read(img_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            frame = np.zeros((*qx.shape, 3), np.uint8)
        panel = make_panel(frame, qx, qy, bound, max_flow)
        target = out / f"viz_{index.replace('.jpg', '.png')}"
        cv2.imwrite(str(target), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        written.append(target)
    return written


@click.command("viz")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Write at most N panels.")
@click.option("--bound", type=float, help="Quantization bound in px [default: from meta.json, 20].")
@click.option("--max-flow", type=float, help="Flow magnitude drawn fully saturated [default: max].")
def viz_command(
    folder: Path, out: Path, limit: int | None, bound: float | None, max_flow: float | None
) -> None:
    """Write PNG panels (frame | flow colour wheel | flow_x | flow_y) of one video FOLDER to OUT."""
    try:
        written = write_panels(folder, out, limit=limit, bound=bound, max_flow=max_flow)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {len(written)} panels to {out}")
