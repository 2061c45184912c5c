"""The ±bound flow-to-JPEG mapping of the two-stream papers and denseflow, and its inverse.

Each flow component v is clipped to [-bound, bound] pixels and stored as
q = round(255 * (v + bound) / (2 * bound)), a grayscale uint8 image (flow_x_*.jpg, flow_y_*.jpg).
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_BOUND = 20.0  # pixels; Simonyan & Zisserman, Feichtenhofer et al. and denseflow use 20


def _check_bound(bound: float) -> float:
    if not bound > 0:
        raise ValueError(f"flow bound must be > 0, got {bound}")
    return float(bound)


def quantize_flow(flow: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Map flow in pixels to uint8: clip to ±bound, then round(255 * (v + b) / (2b)).

    Any shape works (a component, or (..., 2) flow); NaN maps to 128, the code nearest zero flow.
    """
    b = _check_bound(bound)
    v = np.nan_to_num(np.asarray(flow, dtype=np.float32), nan=0.0)
    q = np.rint(255.0 * (np.clip(v, -b, b) + b) / (2.0 * b))
    return q.astype(np.uint8)


def dequantize_flow(q: np.ndarray, bound: float = DEFAULT_BOUND) -> np.ndarray:
    """Inverse of quantize_flow: uint8 codes back to float32 pixels in [-bound, bound].

    The round trip errs by at most bound / 255 for flow inside ±bound (before any JPEG loss).
    """
    b = _check_bound(bound)
    q = np.asarray(q)
    if q.dtype != np.uint8:
        raise ValueError(f"quantized flow must be uint8, got {q.dtype}")
    return (q.astype(np.float32) * (2.0 * b / 255.0) - b).astype(np.float32)


def encode_flow_jpeg(component: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of one quantized flow component, a uint8 (H, W) image (flow_x or flow_y).

    Grayscale JPEG as denseflow writes it; quality 95 is cv2's default.
    """
    component = np.asarray(component)
    if component.dtype != np.uint8 or component.ndim != 2:
        raise ValueError(
            f"a flow component must be uint8 (H, W), got {component.dtype} {component.shape}"
        )
    ok, buf = cv2.imencode(".jpg", component, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for a {component.shape} flow component")
    return buf.tobytes()


def decode_flow_jpeg(data: bytes) -> np.ndarray:
    """uint8 (H, W) quantized flow component from JPEG bytes (inverse of encode_flow_jpeg).

    Raises ValueError on bytes that are not a decodable image.
    """
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("could not decode flow JPEG bytes")
    return img
