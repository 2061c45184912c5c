"""TV-L1 flow: torch backend against OpenCV's DualTVL1 and known warps of real frames."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import flowprep.flow
from flowprep import openmp
from flowprep.flow import compute_flow, run_single_threaded
from flowprep.tvl1 import (
    TVL1Params,
    build_pyramid,
    compiled_median,
    median_blur,
    median_comparators,
    median_network,
    odd_even_merge_comparators,
    pair_sums,
    resize_linear,
    tvl1,
    warp_bicubic,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE = (128, 96)  # (W, H) every real frame is reduced to, to keep the OpenCV reference cheap
MARGIN = 10  # px left out of EPE at the border, where the warped frame has no source pixels


def _data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"sample data folder missing: {DATA}")
    return DATA


def middlebury(name: str) -> np.ndarray:
    img = cv2.imread(str(_data() / "frames" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
    return cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA)


def video_frames(name: str, start: int, count: int) -> np.ndarray:
    import av

    frames = []
    with av.open(str(_data() / "videos" / name)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                gray = frame.to_ndarray(format="gray")
                frames.append(cv2.resize(gray, SIZE, interpolation=cv2.INTER_AREA))
            if len(frames) == count:
                break
    return np.stack(frames)


def known_flow(kind: str) -> np.ndarray:
    """A smooth (H, W, 2) flow: a translation, or a rotation + zoom about the centre (≤ ~8 px)."""
    h, w = SIZE[1], SIZE[0]
    y, x = np.mgrid[:h, :w].astype(np.float32)
    if kind == "translation":
        return np.stack((np.full_like(x, 2.6), np.full_like(y, -1.7)), axis=-1)
    cx, cy, angle, zoom = (w - 1) / 2, (h - 1) / 2, np.deg2rad(4.0), 1.05
    dx, dy = x - cx, y - cy
    u = zoom * (np.cos(angle) * dx - np.sin(angle) * dy) - dx
    v = zoom * (np.sin(angle) * dx + np.cos(angle) * dy) - dy
    return np.stack((u, v), axis=-1).astype(np.float32)


def warped_pair(nxt: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """prev with prev(x) = nxt(x + flow(x)): the pair (prev, nxt) has ground-truth flow `flow`."""
    h, w = nxt.shape
    y, x = np.mgrid[:h, :w].astype(np.float32)
    prev = cv2.remap(nxt.astype(np.float32), x + flow[..., 0], y + flow[..., 1], cv2.INTER_CUBIC)
    return np.clip(np.rint(prev), 0, 255).astype(np.uint8)


def epe(a: np.ndarray, b: np.ndarray) -> float:
    """Mean end-point error inside the margin."""
    d = np.linalg.norm(a - b, axis=-1)
    return float(d[MARGIN:-MARGIN, MARGIN:-MARGIN].mean())


@pytest.mark.parametrize(
    ("source", "kind"),
    [("rubberwhale", "translation"), ("basketball", "rotation_zoom"), ("tree", "rotation_zoom")],
)
def test_epe_on_known_warps_matches_opencv(source, kind):
    nxt = video_frames("tree.avi", 40, 1)[0] if source == "tree" else middlebury(f"{source}1")
    gt = known_flow(kind)
    prev = warped_pair(nxt, gt)
    ours = compute_flow(prev, nxt, device="cpu")
    ref = compute_flow(prev, nxt, backend="opencv")
    ours_epe, ref_epe = epe(ours, gt), epe(ref, gt)
    assert ref_epe < 1.0
    assert ours_epe < 1.0
    assert ours_epe <= max(1.05 * ref_epe, ref_epe + 0.02), (ours_epe, ref_epe)


def test_agreement_with_opencv_on_real_consecutive_frames():
    pairs = [
        (middlebury("rubberwhale1"), middlebury("rubberwhale2")),
        (middlebury("basketball1"), middlebury("basketball2")),
        tuple(video_frames("Megamind.avi", 30, 2)),
    ]
    prev = np.stack([p for p, _ in pairs])
    nxt = np.stack([n for _, n in pairs])
    ours = compute_flow(prev, nxt, device="cpu")
    ref = compute_flow(prev, nxt, backend="opencv", jobs=1)
    for o, r in zip(ours, ref, strict=True):
        d = np.linalg.norm(o - r, axis=-1)
        # measured: means 0.009-0.014 px, 99th percentiles 0.06-0.10 px (stop-test flips)
        assert d.mean() < 0.04, d.mean()
        assert np.percentile(d, 99) < 0.3


def test_one_iteration_schedule_matches_opencv_exactly():
    # One level, one warp, a few inner steps: no stopping decisions, so the two must agree to
    # float rounding; this pins the warp, gradients, thresholding, divergence and dual update.
    a, b = middlebury("rubberwhale1"), middlebury("rubberwhale2")
    kw = dict(nscales=1, warps=2, outer_iterations=2, inner_iterations=5)
    d = np.abs(compute_flow(a, b, device="cpu", **kw) - compute_flow(a, b, backend="opencv", **kw))
    assert d.max() < 5e-4  # measured 8e-5


def test_batch_equals_pairs_one_by_one():
    frames = video_frames("Megamind.avi", 10, 3)[:, :40, :48]
    batch = compute_flow(frames[:-1], frames[1:], device="cpu", nscales=2)
    for k in range(2):
        single = compute_flow(frames[k], frames[k + 1], device="cpu", nscales=2)
        np.testing.assert_allclose(batch[k], single, atol=1e-5)


def test_eager_cpu_batch_runs_a_pair_per_thread_and_equals_each_pair_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = np.stack(  # from 128x128 up a pair per thread
        [
            cv2.resize(f, (160, 128), interpolation=cv2.INTER_CUBIC)
            for f in video_frames("Megamind.avi", 10, 4)
        ]
    )
    seen = []
    solve = flowprep.flow._solve

    def spy(i0, *args):
        seen.append((len(i0), threading.current_thread().name, torch.get_num_threads()))
        return solve(i0, *args)

    monkeypatch.setattr(flowprep.flow, "_solve", spy)
    kw = dict(device="cpu", nscales=2, warps=2)
    batch = compute_flow(frames[:-1], frames[1:], **kw)
    if torch.get_num_threads() > 1 and openmp.available():
        assert len(seen) == 3
        assert all(n == 1 and name.startswith("flowprep-tvl1-") and t == 1 for n, name, t in seen)
    seen.clear()
    for k in range(3):  # alone: in this thread, on all its cores
        np.testing.assert_array_equal(batch[k], compute_flow(frames[k], frames[k + 1], **kw))
    assert [name for _, name, _ in seen] == [threading.current_thread().name] * 3


def test_pair_sums_do_not_depend_on_batch_mates_or_threads() -> None:
    # the per-step error behind each pair's stop test: a pair alone on several cores, in a batch,
    # and on one core must sum to the same bits, or its flow could depend on how it was solved
    for shape in ((2, 256, 341), (2, 20000, 3)):  # a frame, and one taller than torch's grain
        d = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
        batch = pair_sums(d)
        alone = torch.stack([pair_sums(d[i : i + 1])[0] for i in range(5)])
        one_core = run_single_threaded(lambda i, d=d: pair_sums(d[i : i + 1])[0], [*range(5)], 2)
        assert torch.equal(alone, batch)
        assert torch.equal(torch.stack(one_core), batch)
        expected = d.double().sum(dim=(1, 2, 3))
        torch.testing.assert_close(batch.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.skipif(not openmp.available(), reason="torch has no OpenMP runtime we can reach")
def test_run_single_threaded_keeps_order_and_runs_each_thread_on_one_core() -> None:
    def probe(x: int) -> tuple[int, int, str]:
        return x * x, torch.get_num_threads(), threading.current_thread().name

    out = run_single_threaded(probe, list(range(10)), 3)
    assert [o[0] for o in out] == [x * x for x in range(10)]
    assert {o[1] for o in out} == {1}
    assert {o[2] for o in out} <= {"flowprep-tvl1-0", "flowprep-tvl1-1", "flowprep-tvl1-2"}


@pytest.mark.skipif(not openmp.available(), reason="torch has no OpenMP runtime we can reach")
def test_one_core_threads_leave_other_threads_their_cores() -> None:
    # torch.set_num_threads(1) in a worker would also become the count of every thread started
    # later (and of MKL everywhere): only the worker itself may run on one core
    cores = torch.get_num_threads()
    assert run_single_threaded(lambda _: torch.get_num_threads(), [0, 1], 2) == [1, 1]
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [cores] and torch.get_num_threads() == cores


@pytest.mark.parametrize("waits_before", [0, 2])  # in the first thread's start(), after both
def test_interrupted_caller_stops_the_threads_before_it_raises(
    monkeypatch: pytest.MonkeyPatch, waits_before: int
) -> None:
    # Ctrl-C while the caller waits: the threads must finish the item in hand and take no more
    # before KeyboardInterrupt goes on, or the process exits while they are inside torch (abort)
    done = []
    wait = threading.Event.wait
    caller = threading.current_thread()
    calls = []

    def wait_once_interrupted(self, timeout=None):
        if threading.current_thread() is caller:
            calls.append(True)
            if len(calls) == waits_before + 1:
                time.sleep(0.05)
                raise KeyboardInterrupt
        return wait(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", wait_once_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_single_threaded(lambda i: time.sleep(0.01) or done.append(i), list(range(200)), 2)
    finished = len(done)
    time.sleep(0.1)
    assert 0 < finished == len(done) < 200  # none still working once the caller raised


def test_a_failing_pin_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise OSError("omp_set_num_threads unavailable")

    monkeypatch.setattr(openmp, "one_core_in_this_thread", broken)
    with pytest.raises(OSError, match="omp_set_num_threads unavailable"):
        run_single_threaded(lambda i: i, [1, 2, 3], 2)


@pytest.mark.skipif(torch.get_num_threads() == 1, reason="one core: any pin 'takes'")
def test_a_pin_that_does_not_take_is_not_relied_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # an OpenMP runtime that is not torch's (several mapped) leaves the count unchanged: then
    # eager flow must stay pair by pair in the calling thread, not oversubscribe the cores
    monkeypatch.setattr(openmp, "_omp_set_num_threads", lambda: lambda n: None)
    openmp.available.cache_clear()
    try:
        assert openmp.available() is False
        seen = []
        solve = flowprep.flow._solve
        monkeypatch.setattr(
            flowprep.flow, "_solve", lambda *a: seen.append(threading.current_thread()) or solve(*a)
        )
        frames = np.zeros((3, 128, 128), np.uint8)
        compute_flow(frames[:-1], frames[1:], device="cpu", nscales=1, warps=1)
        assert seen == [threading.current_thread()] * 2
    finally:
        openmp.available.cache_clear()


def test_an_error_on_a_solver_thread_reaches_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(i0, *args):
        raise RuntimeError(f"solver broke on {len(i0)} pair")

    monkeypatch.setattr(flowprep.flow, "_solve", broken)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # threads even on a 1-core runner
    frames = np.zeros((4, 128, 128), np.uint8)
    with pytest.raises(RuntimeError, match="solver broke on 1 pair"):
        compute_flow(frames[:-1], frames[1:], device="cpu")


def test_float_frames_read_as_0_to_1():
    a, b = middlebury("rubberwhale1")[:32, :32], middlebury("rubberwhale2")[:32, :32]
    kw = dict(nscales=1, warps=1)
    f8 = compute_flow(a, b, device="cpu", **kw)
    ff = compute_flow(a / 255.0, b / 255.0, device="cpu", **kw)
    np.testing.assert_allclose(f8, ff, atol=1e-4)


def test_identical_frames_give_zero_flow():
    a = middlebury("basketball1")
    flow = compute_flow(np.stack([a, a]), np.stack([a, a]), device="cpu")
    assert flow.shape == (2, SIZE[1], SIZE[0], 2) and flow.dtype == np.float32
    assert np.abs(flow).max() == 0.0


@pytest.mark.parametrize("shape", [(2, 2), (2, 7), (5, 3), (15, 15), (16, 17)])
def test_tiny_frames_finite(shape):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.roll(a, 1, axis=1)
    for backend in ("torch", "opencv"):
        flow = compute_flow(a, b, backend=backend, device="cpu")
        assert flow.shape == (*shape, 2)
        assert np.isfinite(flow).all()


def test_constant_frames_no_nan():
    a, b = np.full((20, 24), 7, np.uint8), np.full((20, 24), 90, np.uint8)
    flow = compute_flow(a, b, device="cpu")
    assert np.isfinite(flow).all() and np.abs(flow).max() == 0.0


@pytest.mark.parametrize(
    ("prev", "nxt", "kwargs", "message"),
    [
        (np.zeros((8, 8)), np.zeros((8, 9)), {}, "shapes differ"),
        (np.zeros((1, 8)), np.zeros((1, 8)), {}, "at least 2x2"),
        (np.zeros((8, 1)), np.zeros((8, 1)), {}, "at least 2x2"),
        (np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)), {}, "grayscale"),
        (np.zeros((0, 8, 8)), np.zeros((0, 8, 8)), {}, "N = 0"),
        (np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32), {}, "uint8 or float"),
        (np.full((8, 8), np.nan), np.zeros((8, 8)), {}, "NaN"),
        (np.zeros((8, 8)), np.zeros((8, 8)), {"backend": "gpu"}, "backend"),
        (np.zeros((8, 8)), np.zeros((8, 8)), {"lamda": 0.1}, "unknown TV-L1 parameter"),
        (np.zeros((8, 8)), np.zeros((8, 8)), {"median_filtering": 4}, "odd"),
        (np.zeros((8, 8)), np.zeros((8, 8)), {"device": "tpu"}, "device"),
    ],
)
def test_bad_input_is_one_line_value_error(prev, nxt, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        compute_flow(prev, nxt, **kwargs)
    assert "\n" not in str(info.value)


def test_lambda_alias_and_defaults():
    a, b = middlebury("rubberwhale1")[:24, :24], middlebury("rubberwhale2")[:24, :24]
    x = compute_flow(a, b, device="cpu", nscales=1, **{"lambda": 0.05})
    y = compute_flow(a, b, device="cpu", nscales=1, lambda_=0.05)
    z = compute_flow(a, b, device="cpu", nscales=1)
    np.testing.assert_array_equal(x, y)
    assert np.abs(x - z).max() > 1e-3  # lambda is honoured
    assert TVL1Params() == TVL1Params(0.25, 0.15, 0.3, 5, 5, 0.01, 30, 10, 0.8, 5, 0.0)


def test_gamma_reaches_opencv_and_is_refused_by_torch():
    a, b = middlebury("rubberwhale1")[:32, :40], middlebury("rubberwhale2")[:32, :40]
    kw = dict(backend="opencv", jobs=1, nscales=2)
    plain = compute_flow(a, b, **kw)
    lit = compute_flow(a, (b * 0.8).astype(np.uint8), gamma=0.3, **kw)  # illumination change
    assert np.isfinite(lit).all()
    assert np.abs(compute_flow(a, (b * 0.8).astype(np.uint8), **kw) - lit).max() > 0.1
    np.testing.assert_array_equal(compute_flow(a, b, gamma=0.0, **kw), plain)
    with pytest.raises(ValueError) as info:
        compute_flow(a, b, backend="torch", device="cpu", gamma=0.3)
    assert str(info.value) == (
        "gamma=0.3: the illumination term is not implemented by the torch backend; "
        "use backend='opencv' (--flow-backend opencv) or gamma=0"
    )
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        compute_flow(a, b, backend="opencv", gamma=-1.0)


def test_building_blocks_match_opencv():
    rng = np.random.default_rng(3)
    img = (rng.random((37, 53)) * 255).astype(np.float32)
    t = torch.from_numpy(img)[None, None]
    small = cv2.resize(img, None, fx=0.8, fy=0.8)
    pyr = build_pyramid(t, TVL1Params(nscales=2))
    np.testing.assert_allclose(pyr[1][0, 0].numpy(), small, atol=1e-3)
    up = resize_linear(torch.from_numpy(small)[None], img.shape)[0].numpy()
    np.testing.assert_allclose(up, cv2.resize(small, img.shape[::-1]), atol=1e-3)
    generic = median_blur(t.to(torch.float64), 5)[0, 0].numpy()  # the device-agnostic path
    np.testing.assert_allclose(generic, cv2.medianBlur(img, 5), atol=1e-4)
    flow = rng.normal(0, 3, (37, 53, 2)).astype(np.float32)
    y, x = np.mgrid[:37, :53].astype(np.float32)
    ref = cv2.remap(img, x + flow[..., 0], y + flow[..., 1], cv2.INTER_CUBIC)
    ours = warp_bicubic(t, torch.from_numpy(flow).permute(2, 0, 1)[None])[0, 0].numpy()
    assert np.abs(ours - ref).max() < 0.01


@pytest.mark.parametrize("ksize", [3, 5])
def test_median_network_selects_the_median_of_every_0_1_input(ksize: int) -> None:
    # 0-1 principle: a min/max network selects the median of any inputs iff it does so for all
    # 2^(k*k) inputs of 0s and 1s (min = AND, max = OR). Checked exhaustively, 64 inputs a word.
    count = ksize * ksize
    index = np.arange(1 << count, dtype=np.uint32)
    ones = np.zeros(index.shape, dtype=np.uint8)
    slots = []
    for s in range(count):
        bit = ((index >> s) & 1).astype(np.uint8)
        ones += bit
        slots.append(np.packbits(bit))
    for a, b, keep_min, keep_max in median_comparators(count):
        x, y = slots[a], slots[b]
        if keep_min:
            slots[a] = x & y
        if keep_max:
            slots[b] = x | y
    expected = np.packbits((ones > count // 2).astype(np.uint8))
    np.testing.assert_array_equal(slots[count // 2], expected)
    full_sort = odd_even_merge_comparators(16 if ksize == 3 else 32)
    assert len(median_comparators(count)) < len(full_sort)  # pruned: 24 of 63, 113 of 191


def test_compiled_median_network_matches_cv2():
    # what a GPU runs under compile: one fused min/max network kernel per level shape
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(0, 3, (2, 2, 21, 30)).astype(np.float32))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    median_comparators(25)
    ours = compiled_median()(padded, 5)
    ref = np.stack([cv2.medianBlur(img, 5) for img in x.reshape(-1, 21, 30).numpy()])
    np.testing.assert_array_equal(ours.reshape(-1, 21, 30).numpy(), ref)
    eager = median_network(padded, 5)  # the same network, uncompiled
    torch.testing.assert_close(eager, ours, rtol=0, atol=0)


def test_compiled_path_matches_eager():
    # torch.compile of the masked inner iterations (one level, so one cold compile of ~10-20 s;
    # the kernels are cached on disk for later runs). Two pairs exercise the per-pair stop mask.
    frames = video_frames("Megamind.avi", 10, 3)[:, :32, :40]
    kw = dict(nscales=1, warps=2, outer_iterations=3)
    eager = compute_flow(frames[:-1], frames[1:], device="cpu", **kw)
    compiled = compute_flow(frames[:-1], frames[1:], device="cpu", compile=True, **kw)
    assert np.abs(eager).max() > 0.1  # a non-trivial flow
    assert np.abs(compiled - eager).max() < 1e-3
    # another batch size reuses the kernels (dynamic batch dim) instead of recompiling the level
    graphs = counters["stats"]["unique_graphs"]
    more = video_frames("Megamind.avi", 30, 4)[:, :32, :40]
    compiled = compute_flow(more[:-1], more[1:], device="cpu", compile=True, **kw)
    assert counters["stats"]["unique_graphs"] == graphs
    eager = compute_flow(more[:-1], more[1:], device="cpu", **kw)
    assert np.abs(compiled - eager).max() < 1e-3


def test_masking_finished_pairs_equals_compacting_them():
    # the GPU path keeps finished pairs in the batch, masked; the CPU path drops them. Pairs of
    # different motion stop at different iterations, and both ways must give the same flow.
    frames = video_frames("tree.avi", 20, 4)[:, :48, :64]
    i0 = torch.from_numpy(frames[:-1]).float()
    i1 = torch.from_numpy(np.stack([frames[1], frames[1], np.roll(frames[3], 3, axis=1)])).float()
    params = TVL1Params(nscales=2, warps=2)
    compacted = tvl1(i0, i1, params, masked=False)
    masked = tvl1(i0, i1, params, masked=True)
    assert compacted.abs().max() > 0.5
    torch.testing.assert_close(masked, compacted, rtol=0, atol=0)


def test_gpu_code_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # what runs on a GPU, run here: masked steps, compiled kernels, compiled median network
    import flowprep.tvl1 as solver

    def network_median(u: torch.Tensor, ksize: int, compile: bool = False) -> torch.Tensor:
        assert compile
        median_comparators(ksize * ksize)
        return compiled_median()(torch.nn.functional.pad(u, (2, 2, 2, 2), mode="replicate"), 5)

    frames = video_frames("tree.avi", 20, 4)[:, :40, :56]
    i0, i1 = torch.from_numpy(frames[:-1]).float(), torch.from_numpy(frames[1:]).float()
    params = TVL1Params(nscales=1, warps=2, outer_iterations=3)
    cpu = tvl1(i0, i1, params)
    monkeypatch.setattr(solver, "median_blur", network_median)
    gpu_like = tvl1(i0, i1, params, compile=True, masked=True)
    assert cpu.abs().max() > 0.1
    assert (gpu_like - cpu).abs().max() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    a, b = middlebury("rubberwhale1"), middlebury("rubberwhale2")
    cpu = compute_flow(a, b, device="cpu")
    gpu = compute_flow(a, b, device="cuda")
    assert np.linalg.norm(cpu - gpu, axis=-1).mean() < 0.02
