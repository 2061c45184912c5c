"""The ±bound flow quantization, its inverse and the JPEG round trip of a flow component."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from flowprep.quantize import decode_flow_jpeg, dequantize_flow, encode_flow_jpeg, quantize_flow

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_quantize_formula_values():
    v = np.array([-100.0, -20.0, -10.0, 0.0, 10.0, 20.0, 35.0, np.nan], np.float32)
    q = quantize_flow(v)
    assert q.dtype == np.uint8
    # round(255 * (v + 20) / 40): -10 -> 63.75 -> 64, 0 -> 127.5 -> 128, 10 -> 191.25 -> 191
    assert q.tolist() == [0, 0, 64, 128, 191, 255, 255, 128]
    assert quantize_flow(np.array([1.0]), bound=2.0).tolist() == [191]  # 255 * 3 / 4 = 191.25


def test_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    for bound in (20.0, 5.0):
        v = rng.uniform(-bound, bound, (64, 64, 2)).astype(np.float32)
        back = dequantize_flow(quantize_flow(v, bound), bound)
        assert back.dtype == np.float32
        err = np.abs(back - v)
        assert err.max() <= bound / 255 + 1e-5  # half the step 2b/255
        assert err.max() > 0.9 * bound / 255  # and the bound is tight, not loose
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantize_flow(dequantize_flow(codes)), codes)


def test_jpeg_round_trip_error_on_real_flow():
    if not DATA.is_dir():
        pytest.skip(f"sample data folder missing: {DATA}")
    frames = [
        cv2.resize(cv2.imread(str(DATA / "frames" / f"rubberwhale{i}.png"), 0), (128, 96))
        for i in (1, 2)
    ]
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(nscales=3)
    flow = tvl1.calc(frames[0], frames[1], None) * 4.0  # up to ~8 px, a typical video range
    q = quantize_flow(flow)
    back = np.stack(
        [dequantize_flow(decode_flow_jpeg(encode_flow_jpeg(q[..., c]))) for c in (0, 1)], -1
    )
    err = np.abs(back - flow)
    step = 40.0 / 255
    # measured: mean 0.054 px, 99th percentile 0.23 px, max 1.17 px (JPEG q95 ringing at motion
    # edges); quantization alone is at most step / 2 = 0.078 px.
    assert err.mean() < step / 2
    assert np.percentile(err, 99) < 2 * step
    assert err.max() < 2.0


def test_jpeg_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_flow_jpeg(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="decode"):
        decode_flow_jpeg(b"not a jpeg")
    with pytest.raises(ValueError, match="bound"):
        quantize_flow(np.zeros(3), bound=0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_flow(np.zeros(3, np.int64))
