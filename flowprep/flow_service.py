"""Device threads that compute flow for chunks of frame pairs sent by many decoding threads.

Several videos decode at once and each queues its chunks; one thread per device (per visible
GPU, or one for the CPU) takes the next chunk, so a device never waits for one slow video.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

ComputeFn = Callable[..., np.ndarray]


def resolve_devices(device: str) -> list[str]:
    """Devices behind a `--device` value: every visible GPU for cuda/auto-with-GPU, else cpu."""
    if device == "cpu":
        return ["cpu"]
    import torch

    if device.startswith("cuda:"):
        return [device]
    if not torch.cuda.is_available():
        if device == "cuda":
            raise ValueError("--device cuda, but torch sees no CUDA device")
        return ["cpu"]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


class FlowService:
    """A queue of flow requests served by one thread per device; `submit` returns a Future.

    The queue is bounded (`depth` chunks per device) so fast decoders block instead of holding
    every decoded frame of the corpus in memory.
    """

    def __init__(
        self,
        devices: list[str],
        *,
        backend: str = "torch",
        compute: ComputeFn | None = None,
        depth: int = 4,
        compile: bool = False,
    ) -> None:
        if compute is None:
            from flowprep.flow import compute_flow as compute
        self._compute, self._backend = compute, backend
        self._extra = {"compile": True} if compile else {}
        self._queue: queue.Queue = queue.Queue(maxsize=depth * len(devices))
        self._threads = [
            threading.Thread(target=self._serve, args=(d,), daemon=True, name=f"flow-{d}")
            for d in devices
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, prev: np.ndarray, nxt: np.ndarray) -> Future:
        """Queue flow from `prev` (N, H, W) to `nxt` (N, H, W); the Future gives (N, H, W, 2)."""
        future: Future = Future()
        self._queue.put((prev, nxt, future))
        return future

    def _serve(self, device: str) -> None:
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)
        kind = "cuda" if device.startswith("cuda") else "cpu"
        while True:
            item = self._queue.get()
            if item is None:
                return
            prev, nxt, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                flow = self._compute(prev, nxt, backend=self._backend, device=kind, **self._extra)
                future.set_result(np.asarray(flow, dtype=np.float32))
            except BaseException as exc:  # noqa: BLE001 - handed to the video that asked
                future.set_exception(exc)

    def close(self) -> None:
        """Stop the device threads after the queued requests are served."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> FlowService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
