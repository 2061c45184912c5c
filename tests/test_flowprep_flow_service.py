"""FlowService: chunks of several videos joined into device batches, failures kept per video."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_flowprep_extract import tree_bytes

import flowprep.cli
import flowprep.flow
import flowprep.tvl1
from flowprep.cli import main
from flowprep.extract import decoders_per_device, joblib_mapper, run_batch
from flowprep.flow import compute_flow, wants_compile
from flowprep.flow_service import FlowService
from flowprep.manifest import build_manifest
from flowprep.settings import ExtractSettings, RuntimeOptions
from flowprep.writing import FlowWriter
from pipelines.synthetic import moving_shapes, write_video


class GatedCompute:
    """A fake flow whose first call waits for `release`, so requests pile up in the queue.

    Flow (x, y) = (prev, nxt): every output pair shows which input pair it was computed from.
    """

    def __init__(self, fail_marker: float | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: list[int] = []
        self.fail_marker = fail_marker

    def __call__(self, prev: np.ndarray, nxt: np.ndarray, **_: object) -> np.ndarray:
        self.started.set()
        self.release.wait(timeout=10)
        self.calls.append(len(prev))
        if self.fail_marker is not None and (prev == self.fail_marker).any():
            raise ValueError("bad chunk")
        return np.stack((prev, nxt), axis=-1).astype(np.float32)


def chunk(value: float, pairs: int, size: tuple[int, int] = (4, 6)) -> np.ndarray:
    return np.full((pairs, *size), value, dtype=np.float32)


def test_queued_chunks_of_one_size_join_into_device_batches() -> None:
    compute = GatedCompute()
    with FlowService(["cpu"], compute=compute, device_batch=6, chunk=2) as service:
        first = service.submit(chunk(0, 2), chunk(100, 2))
        assert compute.started.wait(5)  # the device is busy with the first chunk
        same = [service.submit(chunk(i, 2), chunk(100 + i, 2)) for i in range(1, 6)]
        other = service.submit(chunk(9, 3, (8, 8)), chunk(109, 3, (8, 8)))
        compute.release.set()
        results = [f.result(timeout=10) for f in (first, *same, other)]
    # 1 alone (busy), then 3 chunks (6 pairs, the limit), then the last 2 (the other size is
    # held back), then the other size alone
    assert compute.calls == [2, 6, 4, 3]
    assert service.batch_sizes == compute.calls
    for value, flow in zip([0, 1, 2, 3, 4, 5, 9], results, strict=True):
        assert flow.shape[-1] == 2
        assert (flow[..., 0] == value).all() and (flow[..., 1] == 100 + value).all()


def test_a_failing_chunk_fails_only_its_own_request() -> None:
    compute = GatedCompute(fail_marker=2.0)
    with FlowService(["cpu"], compute=compute, device_batch=64) as service:
        head = service.submit(chunk(0, 1), chunk(0, 1))
        assert compute.started.wait(5)
        futures = [service.submit(chunk(i, 2), chunk(i, 2)) for i in (1, 2, 3)]
        compute.release.set()
        assert head.result(timeout=10)[..., 0].max() == 0
        assert futures[0].result(timeout=10)[..., 0].max() == 1
        with pytest.raises(ValueError, match="bad chunk"):
            futures[1].result(timeout=10)
        assert futures[2].result(timeout=10)[..., 0].max() == 3
    # the joined batch of three failed, then each was retried alone
    assert compute.calls == [1, 6, 2, 2, 2]


def test_close_serves_what_is_queued_and_stops_every_device_thread() -> None:
    compute = GatedCompute()
    service = FlowService(["cpu", "cpu", "cpu"], compute=compute, device_batch=4, chunk=1)
    futures = [service.submit(chunk(i, 1), chunk(i, 1)) for i in range(7)]
    compute.release.set()
    service.close()
    assert [f.result(timeout=1)[0, 0, 0, 0] for f in futures] == list(range(7))
    assert not any(t.is_alive() for t in service._threads)
    assert sum(compute.calls) == 7


def test_real_flow_is_the_same_joined_or_alone() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 24, 32)).astype(np.uint8)
    nxt = np.roll(base, 1, axis=2)
    alone = np.concatenate(
        [compute_flow(base[i : i + 2], nxt[i : i + 2], device="cpu") for i in (0, 2, 4)]
    )
    with FlowService(["cpu"], device_batch=6, chunk=2) as service:
        futures = [service.submit(base[i : i + 2], nxt[i : i + 2]) for i in (0, 2, 4)]
        joined = np.concatenate([f.result(timeout=60) for f in futures])
    np.testing.assert_array_equal(joined, alone)


def test_extract_with_joined_batches_writes_what_the_per_video_loop_does(tmp_path: Path) -> None:
    root = tmp_path / "v"
    for i in range(4):
        frames = moving_shapes(7 + i, 32, 40, velocity=(1.0 + i, 0.5), seed=i)
        write_video(root / f"c{i}.mkv", frames, codec="ffv1")
    entries = build_manifest(root)
    settings = ExtractSettings(short_side=0, modality="flow", flow_format="npy")
    options = RuntimeOptions(device="cpu", flow_batch=2, device_batch=5)
    run_batch(entries, root, tmp_path / "joined", settings, options=options, jobs=4)
    run_batch(entries, root, tmp_path / "plain", settings, options=options, mapper=joblib_mapper(1))
    assert tree_bytes(tmp_path / "joined") == tree_bytes(tmp_path / "plain")
    assert len(list((tmp_path / "joined").glob("c3/flow_*.npy"))) == 9


def test_a_gpu_gets_enough_decoders_to_fill_two_device_batches() -> None:
    options = RuntimeOptions(flow_batch=8, device_batch=64)
    per_video = (FlowWriter.MAX_INFLIGHT + 1) * 8
    assert decoders_per_device(["cuda:0"], options) * per_video >= 2 * 64
    assert decoders_per_device(["cpu"], options) == 2


def test_auto_compile_only_for_frames_worth_compiling() -> None:
    assert wants_compile("auto", 256, 341) and wants_compile("auto", 120, 160)
    assert not wants_compile("auto", 48, 64)
    assert wants_compile(True, 4, 4) and not wants_compile(False, 256, 341)
    with pytest.raises(ValueError, match="compile must be"):
        wants_compile("yes", 256, 341)


def test_a_broken_compiler_costs_speed_not_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(flowprep.tvl1, "compiled_steps", no_compiler)
    monkeypatch.setattr(flowprep.flow, "_compile_failure", None)
    rng = np.random.default_rng(1)
    prev = rng.integers(0, 256, (2, 20, 24)).astype(np.uint8)
    nxt = np.roll(prev, 2, axis=1)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*No working C.. compiler"):
        flow = compute_flow(prev, nxt, device="cpu", compile=True)
    np.testing.assert_array_equal(flow, compute_flow(prev, nxt, device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls go straight to eager
        compute_flow(prev, nxt, device="cpu", compile=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [([], "auto"), (["--flow-compile"], True), (["--flow-compile", "off"], False)],
)
def test_flow_compile_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], expected: object
) -> None:
    seen: dict = {}

    def fake_run_batch(entries, root, out, settings, *, options, **kwargs):  # noqa: ANN001, ANN202
        seen["options"] = options
        return []

    monkeypatch.setattr(flowprep.cli, "run_batch", fake_run_batch)
    write_video(tmp_path / "v" / "a.mkv", moving_shapes(2, 16, 16, seed=0), codec="ffv1")
    cmd = ["extract", str(tmp_path / "v"), "-o", str(tmp_path / "o"), "-q", "--device-batch", "9"]
    result = CliRunner().invoke(main, [*cmd, *args])
    assert result.exit_code == 0, result.output
    assert seen["options"].flow_compile == expected
    assert seen["options"].device_batch == 9


def test_extract_says_when_it_compiles_and_goes_on_when_it_cannot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_compiler() -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(flowprep.tvl1, "compiled_steps", no_compiler)
    monkeypatch.setattr(flowprep.flow, "_compile_failure", None)
    monkeypatch.setattr(flowprep.flow, "_compiled_sizes", set())
    write_video(tmp_path / "v" / "a.mkv", moving_shapes(4, 32, 40, seed=0), codec="ffv1")
    out = tmp_path / "o"
    args = ["extract", str(tmp_path / "v"), "-o", str(out), "--modality", "flow"]
    args += ["--short-side", "0", "--device", "cpu", "--flow-compile", "on"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "flowprep: TV-L1: compiling kernels for 40x32 frames on cpu" in result.output
    assert len(list(out.glob("a/flow_x_*.jpg"))) == 3  # computed eagerly instead


class DeviceThatDies(FlowService):
    """A service whose first `dead` device threads fail to start (as a CUDA init error would)."""

    def __init__(self, devices: list[str], dead: int, **kwargs: object) -> None:
        self._dead, self._count_lock = dead, threading.Lock()
        super().__init__(devices, **kwargs)

    def _serve_batches(self, kind: str, held) -> None:  # noqa: ANN001
        with self._count_lock:
            self._dead -= 1
            dies = self._dead >= 0
        if dies:
            raise RuntimeError("CUDA error: initialization error")
        super()._serve_batches(kind, held)


def test_a_device_that_cannot_start_fails_the_chunks_instead_of_hanging() -> None:
    compute = GatedCompute()
    compute.release.set()
    service = DeviceThatDies(["cpu"], dead=1, compute=compute, device_batch=4, chunk=1)
    futures = [service.submit(chunk(i, 1), chunk(i, 1)) for i in range(12)]  # > queue depth
    for f in futures:
        with pytest.raises(RuntimeError, match="flow device cpu failed: RuntimeError: CUDA error"):
            f.result(timeout=10)
    service.close()
    with pytest.raises(RuntimeError, match="submit after close"):
        service.submit(chunk(0, 1), chunk(0, 1))


def test_the_other_devices_serve_what_a_dead_one_would_have() -> None:
    compute = GatedCompute()
    compute.release.set()
    with DeviceThatDies(["cpu"] * 3, dead=2, compute=compute, device_batch=4, chunk=1) as service:
        futures = [service.submit(chunk(i, 1), chunk(i, 1)) for i in range(20)]
        assert [f.result(timeout=10)[0, 0, 0, 0] for f in futures] == list(range(20))


def test_compile_settings_hold_in_every_thread() -> None:
    # dynamo's config is per thread: limits set once in one thread did not reach the others
    import torch._dynamo

    seen = []

    def read() -> None:
        with flowprep.tvl1.compile_settings():
            config = torch._dynamo.config
            seen.append((config.recompile_limit, config.automatic_dynamic_shapes))

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
        t.join()
    assert seen == [(1024, False), (1024, False)]


def test_out_of_memory_while_compiling_is_not_blamed_on_the_compiler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    def oom_inside_compile() -> None:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised") from exc

    monkeypatch.setattr(flowprep.tvl1, "compiled_steps", oom_inside_compile)
    monkeypatch.setattr(flowprep.flow, "_compile_failure", None)
    frame = np.zeros((20, 24), np.uint8)
    with pytest.raises(RuntimeError, match="BackendCompilerFailed"):
        compute_flow(frame, frame, device="cpu", compile=True)
    assert flowprep.flow._compile_failure is None  # compile stays on for the next batch


@pytest.mark.parametrize(("size", "expected"), [((48, 64), [6]), ((120, 160), [1] * 6)])
def test_cpu_pairs_never_share_a_reduction_that_torch_splits(
    monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], expected: list[int]
) -> None:
    # at 120x160 a pair's error sum (38,400 values) is split over threads when it is alone and
    # not when it has batch mates; the eager solver sums row by row (tvl1.pair_sums) to avoid
    # that, compiled kernels may not, so from 128x128 up pairs are solved alone either way
    import torch

    d = torch.randn(8, 2, 120, 160, generator=torch.Generator().manual_seed(0))
    alone = torch.stack([d[i : i + 1].square().sum(dim=(1, 2, 3))[0] for i in range(8)])
    if torch.get_num_threads() > 1:
        assert not torch.equal(alone, d.square().sum(dim=(1, 2, 3)))  # the premise, measured
    sizes = []
    solve = flowprep.flow._solve
    monkeypatch.setattr(
        flowprep.flow, "_solve", lambda i0, *a: sizes.append(len(i0)) or solve(i0, *a)
    )
    frames = np.zeros((7, *size), np.uint8)
    compute_flow(frames[:-1], frames[1:], device="cpu", nscales=1, warps=1, outer_iterations=1)
    assert sizes == expected


def test_device_option_takes_cuda_n_and_a_missing_gpu_is_one_line(tmp_path, monkeypatch):
    import torch

    from flowprep.flow_service import resolve_devices

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.avi").write_bytes(b"not decoded: the device is refused first")
    base = ["extract", str(tmp_path / "v"), "-o", str(tmp_path / "o"), "--modality", "flow"]
    r = CliRunner().invoke(main, [*base, "--device", "gpu"])
    assert r.exit_code == 2 and "'gpu' is not one of auto, cpu, cuda or cuda:N" in r.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(main, [*base, "--device", "cuda:1"])
    assert r.exit_code == 2 and "Error: --device cuda:1, but torch sees no CUDA device" in r.output
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("cuda:1") == ["cuda:1"]
    assert resolve_devices("cuda") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"--device cuda:2, but torch sees 2 CUDA device\(s\)"):
        resolve_devices("cuda:2")
