"""Device threads that compute flow for chunks of frame pairs sent by many decoding threads.

Several videos decode at once and each queues its chunks; one thread per device (per visible
GPU, or one for the CPU) takes the queued chunks of equal frame size, up to `device_batch`
pairs from several videos, and solves them as one batch, so a GPU never waits for one video
and sees batches large enough to fill it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from flowprep import openmp  # noqa: F401 - sets GOMP_SPINCOUNT before torch loads

ComputeFn = Callable[..., np.ndarray]
DEVICE_BATCH = 64  # pairs per device call: the coarse pyramid levels are tiny, a GPU needs many


def resolve_devices(device: str) -> list[str]:
    """Devices behind a `--device` value: every visible GPU for cuda/auto-with-GPU, else cpu;
    `cuda:N` is GPU N alone. ValueError (one line) for a GPU torch does not see."""
    if device == "cpu":
        return ["cpu"]
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no CUDA device")
    if device.startswith("cuda:"):
        if int(device[len("cuda:") :]) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"--device {device}, but torch sees {count} CUDA device(s)")
        return [device]
    if not torch.cuda.is_available():
        return ["cpu"]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@dataclass(eq=False)  # compared by identity: == on the arrays would be ambiguous
class _Request:
    prev: np.ndarray  # (N, H, W)
    nxt: np.ndarray
    future: Future


class FlowService:
    """A queue of flow requests served by one thread per device; `submit` returns a Future.

    Each device call joins queued requests of one frame size, in arrival order, up to
    `device_batch` pairs (a request is never split). The queue holds about two device batches
    of `chunk`-pair requests per device, so fast decoders block instead of holding every
    decoded frame of the corpus in memory. A joined batch that fails is retried request by
    request, so one bad chunk (or a batch too large for the GPU) fails only its own video.
    """

    def __init__(
        self,
        devices: list[str],
        *,
        backend: str = "torch",
        compute: ComputeFn | None = None,
        device_batch: int = DEVICE_BATCH,
        chunk: int = 8,
        compile: bool | str = False,
    ) -> None:
        if compute is None:
            from flowprep.flow import compute_flow as compute
        self._compute, self._backend = compute, backend
        self._extra = {"compile": compile} if compile else {}
        self.device_batch = max(1, device_batch)
        depth = max(4, 2 * math.ceil(self.device_batch / max(1, chunk)))
        self._queue: queue.Queue = queue.Queue(maxsize=depth * len(devices))
        self.batch_sizes: list[int] = []  # pairs per device call, in order (for tests, benchmarks)
        self._closed = False
        self._live = len(devices)  # device threads still serving
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._serve, args=(d,), daemon=True, name=f"flow-{d}")
            for d in devices
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, prev: np.ndarray, nxt: np.ndarray) -> Future:
        """Queue flow from `prev` (N, H, W) to `nxt` (N, H, W); the Future gives (N, H, W, 2)."""
        if self._closed:
            raise RuntimeError("FlowService.submit after close()")
        future: Future = Future()
        self._queue.put(_Request(prev, nxt, future))
        return future

    def _next_batch(self, held: deque) -> list[_Request] | None:
        """The oldest request and the queued ones of its frame size, up to device_batch pairs.

        Requests of other sizes wait in `held` and go first next time. None once closed and
        nothing is left.
        """
        if held:
            first = held.popleft()
        else:
            first = self._queue.get()
            if first is None:
                self._queue.put(None)  # the one close() marker: leave it for the other threads
                return None
        batch, pairs, shape = [first], len(first.prev), first.prev.shape[1:]
        for item in list(held):  # held ones of this size first: they are older than the queue
            if item.prev.shape[1:] == shape and pairs + len(item.prev) <= self.device_batch:
                held.remove(item)
                batch.append(item)
                pairs += len(item.prev)
        while pairs < self.device_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            if item.prev.shape[1:] != shape or pairs + len(item.prev) > self.device_batch:
                held.append(item)
                if len(held) > 1 or item.prev.shape[1:] == shape:
                    break  # keep `held` short: serve what we have
                continue
            batch.append(item)
            pairs += len(item.prev)
        return batch

    def _run(self, requests: list[_Request], kind: str) -> None:
        prev = np.concatenate([r.prev for r in requests])
        nxt = np.concatenate([r.nxt for r in requests])
        flow = self._compute(prev, nxt, backend=self._backend, device=kind, **self._extra)
        flow = np.asarray(flow, dtype=np.float32)
        self.batch_sizes.append(len(prev))
        start = 0
        for r in requests:
            r.future.set_result(flow[start : start + len(r.prev)])
            start += len(r.prev)

    def _serve(self, device: str) -> None:
        held: deque = deque()
        try:
            if device.startswith("cuda"):
                import torch

                torch.cuda.set_device(device)
            self._serve_batches("cuda" if device.startswith("cuda") else "cpu", held)
        except BaseException as exc:  # noqa: BLE001 - a dead device must not hang the videos
            self._device_failed(device, exc, held)

    def _device_failed(self, device: str, exc: BaseException, held: deque) -> None:
        """Hand this thread's requests to the other devices; the last one fails all that come.

        Without this a device that cannot start (a CUDA error, say) would leave every video
        waiting on its chunks forever.
        """
        with self._lock:
            self._live -= 1
            last = self._live == 0
        if not last:
            for request in held:
                self._queue.put(request)
            return
        error = RuntimeError(f"flow device {device} failed: {type(exc).__name__}: {exc}")
        pending = list(held)
        while True:
            for request in pending:
                if request.future.set_running_or_notify_cancel():
                    request.future.set_exception(error)
            item = self._queue.get()
            if item is None:
                self._queue.put(None)
                return
            pending = [item]

    def _serve_batches(self, kind: str, held: deque) -> None:
        while True:
            batch = self._next_batch(held)
            if batch is None:
                return
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._run(batch, kind)
                continue
            except BaseException as exc:  # noqa: BLE001 - handed to the videos that asked
                if len(batch) == 1:
                    batch[0].future.set_exception(exc)
                    continue
            for r in batch:  # a joined batch failed: find whose chunk it was
                try:
                    self._run([r], kind)
                except BaseException as exc:  # noqa: BLE001
                    r.future.set_exception(exc)

    def close(self) -> None:
        """Stop the device threads after the queued requests are served."""
        self._closed = True
        self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> FlowService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
