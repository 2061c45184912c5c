"""Batched dual TV-L1 optical flow in PyTorch (Zach, Pock & Bischof 2007), as OpenCV computes it.

The steps follow OpenCV's DualTVL1 (coarse-to-fine pyramid with bilinear `scale_step` resizes,
`warps` bicubic warps per level, outer iterations that start with a median filter, inner
primal-dual iterations stopped per pair once the mean squared update falls under epsilon²), so
results match `cv2.optflow.DualTVL1OpticalFlow`. One code path serves CPU and CUDA; the batch
holds many frame pairs, each converging on its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

FLT_EPSILON = 1.1920929e-07
MIN_PYRAMID_SIDE = 16  # OpenCV stops adding levels once a side drops under 16 px


@dataclass
class TVL1Params:
    """DualTVL1 parameters, named and defaulted as OpenCV's."""

    tau: float = 0.25  # time step of the dual (p) update
    lambda_: float = 0.15  # weight of the data term (higher: follows brightness more, less smooth)
    theta: float = 0.3  # coupling between u and the auxiliary v
    nscales: int = 5  # pyramid levels
    warps: int = 5  # warps (re-linearisations) per level
    epsilon: float = 0.01  # stop when the RMS update of u per pixel falls below this
    inner_iterations: int = 30  # primal-dual steps per outer iteration
    outer_iterations: int = 10  # median-filter rounds per warp
    scale_step: float = 0.8  # resize factor between pyramid levels
    median_filtering: int = 5  # median kernel applied to u each outer iteration (<= 1: none)
    gamma: float = 0.0  # illumination term weight (opencv backend only; torch needs 0)

    def __post_init__(self) -> None:
        if self.gamma < 0.0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if not 0.0 < self.scale_step < 1.0:
            raise ValueError(f"scale_step must be in (0, 1), got {self.scale_step}")
        if self.nscales < 1 or self.warps < 1:
            raise ValueError(f"nscales and warps must be >= 1, got {self.nscales}, {self.warps}")
        if self.median_filtering > 1 and self.median_filtering % 2 == 0:
            raise ValueError(f"median_filtering must be odd, got {self.median_filtering}")


def check_torch_params(params: TVL1Params) -> None:
    """Reject what our torch TV-L1 does not implement: the illumination term (gamma > 0)."""
    if params.gamma != 0.0:
        raise ValueError(
            f"gamma={params.gamma}: the illumination term is not implemented by the torch "
            "backend; use backend='opencv' (--flow-backend opencv) or gamma=0"
        )


def _linear_matrix(n_out: int, n_in: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) weights of cv2.resize INTER_LINEAR along one axis (half-pixel centres)."""
    x = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    x = x.clamp(0, n_in - 1)
    x0 = x.floor().long().clamp(max=n_in - 1)
    x1 = (x0 + 1).clamp(max=n_in - 1)
    w1 = x - x0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, x0), 1 - w1, accumulate=True)
    m.index_put_((rows, x1), w1, accumulate=True)
    return m.to(device=like.device, dtype=like.dtype)


def resize_linear(
    img: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None
) -> torch.Tensor:
    """Resize (..., H, W) to `size` as cv2.resize(INTER_LINEAR) does, by two small matmuls.

    `scale` is the source step per output pixel (y, x); cv2 uses 1/fx when fx is given.
    """
    h, w = img.shape[-2:]
    sy, sx = scale if scale is not None else (h / size[0], w / size[1])
    my = _linear_matrix(size[0], h, sy, img)
    mx = _linear_matrix(size[1], w, sx, img)
    return my @ img @ mx.T


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of (B, C, H, W) with replicated borders (OpenCV's centeredGradient)."""
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return gx, gy


def forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of (B, C, H, W), zero on the last column/row (OpenCV forwardGradient)."""
    gx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1, 0, 0))
    gy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence with zero outside the image (adjoint of forward_gradient)."""
    dx = px - F.pad(px[..., :, :-1], (1, 0, 0, 0))
    dy = py - F.pad(py[..., :-1, :], (0, 0, 1, 0))
    return dx + dy


def median_blur(u: torch.Tensor, ksize: int, compile: bool = False) -> torch.Tensor:
    """k×k median of (B, C, H, W) with replicated borders (cv2.medianBlur on float images).

    On the CPU, for k = 3 or 5, cv2.medianBlur itself runs per image (about 30× faster than the
    generic unfold+median, and identical). Elsewhere, `compile` selects the median with a
    min/max network that torch.compile fuses into one kernel (for the GPU); else unfold+median.
    """
    if u.device.type == "cpu" and u.dtype == torch.float32 and ksize in (3, 5):
        flat = u.reshape(-1, *u.shape[-2:]).contiguous().numpy()
        out = np.stack([cv2.medianBlur(img, ksize) for img in flat])
        return torch.from_numpy(out).reshape(u.shape)
    r = ksize // 2
    p = F.pad(u, (r, r, r, r), mode="replicate")  # outside the compiled graph: see compiled_median
    if compile:
        median_comparators(ksize * ksize)  # built outside the traced graph
        return compiled_median()(p, ksize)
    patches = p.unfold(2, ksize, 1).unfold(3, ksize, 1)  # (B, C, H, W, k, k)
    return patches.reshape(*u.shape, ksize * ksize).median(dim=-1).values


def odd_even_merge_comparators(n: int) -> list[tuple[int, int]]:
    """Compare-exchange pairs (low, high) of Batcher's odd-even merge sort of n = 2^m values."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


_NETWORKS: dict[int, tuple[tuple[int, int, bool, bool], ...]] = {}


def median_comparators(count: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """A min/max network whose slot count // 2 ends holding the median of `count` values.

    Batcher's sorting network for the next power of two, with the slots past `count` taken as
    +inf (so every comparator touching them is a no-op) and, walking back from the median slot,
    only the comparators (and of those, only the min or max outputs) the median depends on.
    Entries are (a, b, keep_min_in_a, keep_max_in_b).
    """
    if count not in _NETWORKS:  # a plain dict, not functools.cache: torch.compile reads it
        n = 1 << max(0, (count - 1).bit_length())
        live, kept = {count // 2}, []
        for a, b in reversed(odd_even_merge_comparators(n)):
            if b >= count or (a not in live and b not in live):
                continue
            kept.append((a, b, a in live, b in live))
            live |= {a, b}
        _NETWORKS[count] = tuple(reversed(kept))
    return _NETWORKS[count]


def median_network(padded: torch.Tensor, ksize: int) -> torch.Tensor:
    """k×k median of an already padded (B, C, H + k - 1, W + k - 1) tensor by a min/max network.

    Slow eagerly (hundreds of full-image ops); compiled it is one kernel that keeps the k² values
    of a pixel in registers, where unfold+median writes k² copies of the image and sorts them.
    """
    h, w = padded.shape[-2] - ksize + 1, padded.shape[-1] - ksize + 1
    vals = [padded[..., dy : dy + h, dx : dx + w] for dy in range(ksize) for dx in range(ksize)]
    for a, b, keep_min, keep_max in median_comparators(ksize * ksize):
        x, y = vals[a], vals[b]
        if keep_min:
            vals[a] = torch.minimum(x, y)
        if keep_max:
            vals[b] = torch.maximum(x, y)
    return vals[ksize * ksize // 2]


def compiled_median():
    """median_network under torch.compile, batch size dynamic as in compiled_steps."""
    return compiled(median_network)


def warp_bicubic(images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample (B, C, H, W) `images` at (x + u1, y + u2), bicubic, zero outside (cv2.remap CUBIC).

    OpenCV 5 interpolates float maps exactly (no 1/32 px snapping), as grid_sample does.
    """
    b, _, h, w = images.shape
    ys = torch.arange(h, device=u.device, dtype=u.dtype).view(1, h, 1)
    xs = torch.arange(w, device=u.device, dtype=u.dtype).view(1, 1, w)
    # float64 so that grid_sample's unnormalisation lands exactly on integer pixels: a 1e-5 px
    # float32 error there is enough for the iterations to drift off zero flow on identical frames.
    x = xs.double() + u[:, 0].double()
    y = ys.double() + u[:, 1].double()
    grid = torch.stack((2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1), dim=-1)
    out = F.grid_sample(
        images.double(), grid, mode="bicubic", padding_mode="zeros", align_corners=True
    )
    return out.to(images.dtype)


def build_pyramid(img: torch.Tensor, params: TVL1Params) -> list[torch.Tensor]:
    """Levels of (B, 1, H, W), finest first, each `scale_step` smaller, none under 16 px a side."""
    levels = [img]
    for _ in range(1, params.nscales):
        h, w = levels[-1].shape[-2:]
        size = (round(h * params.scale_step), round(w * params.scale_step))
        if min(size) < MIN_PYRAMID_SIDE:
            break
        inv = 1.0 / params.scale_step
        levels.append(resize_linear(levels[-1], size, (inv, inv)))
    return levels


def _estimate_v(u, i1wx, i1wy, grad, rho_c, l_t):
    """Pointwise thresholding step of the data term (OpenCV's estimateV)."""
    rho = rho_c + i1wx * u[:, :1] + i1wy * u[:, 1:]
    lt_grad = l_t * grad
    step = torch.where(grad > FLT_EPSILON, -rho / grad.clamp_min(FLT_EPSILON), 0.0)
    d = torch.where(rho < -lt_grad, l_t, torch.where(rho > lt_grad, -l_t, step))
    return u + d * torch.cat((i1wx, i1wy), dim=1)


def pair_sums(x: torch.Tensor) -> torch.Tensor:
    """Each pair's sum of (B, C, H, W) values: rows, then columns of row totals, then channels.

    One sum over C x H x W would be split over threads on the CPU when a pair is alone (a single
    output) and not when it has batch mates, so a pair's stop test could depend on its batch
    and the thread count; summed in stages, every output has one thread (B x C outputs at least).
    """
    return x.sum(dim=-1).sum(dim=-1).sum(dim=-1)


def primal_dual_step(u, px, py, i1wx, i1wy, grad, rho_c, l_t: float, theta: float, taut: float):
    """One inner iteration for all pairs: thresholding (v), primal (u) and dual (p) updates.

    Returns the new u, px, py and each pair's summed squared change of u (OpenCV's error).
    """
    v = _estimate_v(u, i1wx, i1wy, grad, rho_c, l_t)
    u_new = v + theta * divergence(px, py)
    error = pair_sums((u_new - u).square())
    ux, uy = forward_gradient(u_new)
    ng = 1.0 + taut * torch.sqrt(ux * ux + uy * uy)
    return u_new, (px + taut * ux) / ng, (py + taut * uy) / ng, error


def masked_steps(u, px, py, active, i1wx, i1wy, grad, rho_c, l_t, theta, taut, eps, n: int):
    """`n` inner iterations with OpenCV's per-pair stop test after each: stopped pairs keep u, p.

    The unit torch.compile fuses: several iterations per call cut the per-call overhead.
    """
    for _ in range(n):
        u_new, px_new, py_new, error = primal_dual_step(
            u, px, py, i1wx, i1wy, grad, rho_c, l_t, theta, taut
        )
        keep = active.view(-1, 1, 1, 1)
        u = torch.where(keep, u_new, u)
        px = torch.where(keep, px_new, px)
        py = torch.where(keep, py_new, py)
        active = active & (error > eps)
    return u, px, py, active


STEPS_PER_CALL = 5  # inner iterations per compiled call
_compiled: dict = {}  # function -> its compiled caller, made once per process
_compile_lock = threading.Lock()  # device threads may ask for the compiled kernels at once


def compile_settings():
    """Dynamo settings for our compiled calls, applied per call: dynamo's config is per thread.

    Only a batch dim marked dynamic may vary (H and W stay static: faster kernels), and the
    recompile limits are raised far above the default 8: 5 levels x (batch 1, dynamic batch)
    per frame size, and datasets bring several sizes; past the limit torch silently runs eagerly.
    """
    import torch._dynamo

    return torch._dynamo.config.patch(
        automatic_dynamic_shapes=False, recompile_limit=1024, accumulated_recompile_limit=4096
    )


def compiled(function):
    """torch.compile(function), called with a dynamic batch dim (when > 1) under compile_settings.

    Made once per function and process. The inductor cache goes to ~/.cache/flowprep/inductor
    unless TORCHINDUCTOR_CACHE_DIR is set; it must be set before torch._dynamo is imported,
    which fixes the folder for the process.
    """
    with _compile_lock:
        if function not in _compiled:
            _compiled[function] = _batch_dynamic(function)
        return _compiled[function]


def _batch_dynamic(function):
    import os
    from pathlib import Path

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache/flowprep/inductor"))
    import torch._dynamo

    compiled_function = torch.compile(function, dynamic=None)

    def call(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors[0].shape[0] > 1:
            for t in tensors:
                torch._dynamo.mark_dynamic(t, 0)
        with compile_settings():
            return compiled_function(*args)

    return call


def compiled_steps():
    """masked_steps under torch.compile: image shapes fixed per pyramid level, batch size dynamic.

    Compiled on first use of each level shape (a batch of one pair gets its own static kernels);
    later batch sizes reuse the kernels instead of recompiling each level for each size, as a GPU
    fed joined batches of varying size would. Kernels are cached on disk (see `compiled`).
    """
    return compiled(masked_steps)


def _inner_iterations(
    u,
    px,
    py,
    data,
    active,
    params: TVL1Params,
    scaled_eps: float,
    compile: bool = False,
    masked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to inner_iterations primal-dual steps on the pairs of this (compacted) batch.

    `data` = (i1wx, i1wy, grad, rho_c); pairs whose update falls to scaled_eps stop changing.
    `masked` (which `compile` needs) runs STEPS_PER_CALL steps between looks at which pairs are
    still active, so a GPU is not stopped to report back after every step.
    """
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    if masked:
        steps = compiled_steps() if compile else masked_steps
        done = 0
        while done < params.inner_iterations and bool(active.any()):
            n = min(STEPS_PER_CALL, params.inner_iterations - done)
            u, px, py, active = steps(
                u, px, py, active, *data, l_t, params.theta, taut, scaled_eps, n
            )
            done += n
        return u, px, py, active
    all_active = True
    for _ in range(params.inner_iterations):
        u_new, px_new, py_new, error = primal_dual_step(u, px, py, *data, l_t, params.theta, taut)
        if all_active:
            u, px, py = u_new, px_new, py_new
        else:
            keep = active.view(-1, 1, 1, 1)
            u = torch.where(keep, u_new, u)
            px = torch.where(keep, px_new, px)
            py = torch.where(keep, py_new, py)
        active = active & (error > scaled_eps)
        n_active = int(active.sum())
        if n_active == 0:
            break
        all_active = n_active == len(active)
    return u, px, py, active


def solve_one_scale(
    i0: torch.Tensor,
    i1: torch.Tensor,
    u: torch.Tensor,
    params: TVL1Params,
    compile: bool = False,
    masked: bool | None = None,
) -> torch.Tensor:
    """Refine flow u (B, 2, H, W) on one pyramid level of images i0, i1 (B, 1, H, W).

    Per pair, iterations stop when the summed squared update falls to epsilon² × H × W, as OpenCV's
    procOneScale does. Finished pairs leave the batch at each outer iteration (compaction), so a
    batch costs what its unfinished pairs cost. Within the inner iterations the eager CPU path
    drops them after every step; compiled or on a GPU (`masked`, default: not the CPU) they are
    masked, and the device is asked which pairs are active only every STEPS_PER_CALL steps.
    """
    if masked is None:
        masked = u.device.type != "cpu"
    masked = masked or compile
    b, _, h, w = i0.shape
    scaled_eps = params.epsilon**2 * h * w
    i1x, i1y = centered_gradient(i1)
    stack = torch.cat((i1, i1x, i1y), dim=1)
    px = torch.zeros_like(u)  # p11, p21: x components of the duals of u1, u2
    py = torch.zeros_like(u)  # p12, p22
    for _ in range(params.warps):
        warped = warp_bicubic(stack, u)
        i1w, i1wx, i1wy = warped[:, :1], warped[:, 1:2], warped[:, 2:]
        grad = i1wx * i1wx + i1wy * i1wy
        rho_c = i1w - i1wx * u[:, :1] - i1wy * u[:, 1:] - i0
        active = torch.ones(b, dtype=torch.bool, device=u.device)
        for _ in range(params.outer_iterations):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            full = len(idx) == b

            def sub(t: torch.Tensor, idx: torch.Tensor = idx, full: bool = full) -> torch.Tensor:
                return t if full else t.index_select(0, idx)

            su, spx, spy = sub(u), sub(px), sub(py)
            if params.median_filtering > 1:
                su = median_blur(su, params.median_filtering, compile)
            data = (sub(i1wx), sub(i1wy), sub(grad), sub(rho_c))
            sact = torch.ones(len(idx), dtype=torch.bool, device=u.device)
            su, spx, spy, sact = _inner_iterations(
                su, spx, spy, data, sact, params, scaled_eps, compile, masked
            )
            if full:
                u, px, py, active = su, spx, spy, sact
            else:
                u, px, py = (
                    u.index_copy(0, idx, su),
                    px.index_copy(0, idx, spx),
                    py.index_copy(0, idx, spy),
                )
                active = active.index_copy(0, idx, sact)
    return u


def tvl1(
    i0: torch.Tensor,
    i1: torch.Tensor,
    params: TVL1Params | None = None,
    compile: bool = False,
    masked: bool | None = None,
) -> torch.Tensor:
    """Dual TV-L1 flow from i0 to i1, both (B, H, W) float in 0..255, as (B, 2, H, W) pixels.

    Convention of OpenCV: i0(x, y) ≈ i1(x + u1, y + u2). Levels are solved coarse to fine and each
    flow is resized up (bilinear) and scaled by 1 / scale_step for the next level. `compile`
    runs the inner iteration through torch.compile (pays off for long jobs, costs a cold compile);
    `masked` picks masking over compaction for finished pairs (see solve_one_scale).
    """
    params = params or TVL1Params()
    check_torch_params(params)
    pyr0 = build_pyramid(i0[:, None].float(), params)
    pyr1 = build_pyramid(i1[:, None].float(), params)
    b = i0.shape[0]
    u = torch.zeros(b, 2, *pyr0[-1].shape[-2:], device=i0.device, dtype=torch.float32)
    for level in range(len(pyr0) - 1, -1, -1):
        u = solve_one_scale(pyr0[level], pyr1[level], u, params, compile, masked)
        if level > 0:
            u = resize_linear(u, tuple(pyr0[level - 1].shape[-2:])) / params.scale_step
    return u
