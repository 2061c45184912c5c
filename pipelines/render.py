"""The eight classes of the synthetic action set: how a clip of each is drawn and rendered.

Two classes per kind, and each kind needs other evidence (see `ACTION_CLASSES`). A clip is
drawn as a `Clip` (a static background and textured sprites with their per-frame positions) so
tests can check the ground truth, mirror it and compare class counterparts, then rendered.

How each pair is made indistinguishable except by its evidence: the sampler of a kind makes the
same random draws in the same order for both classes, and the class only flips one choice. So
for a given generator state the two classes' clips are exact counterparts:
- appearance: the same clip with the pattern swapped (stripes <-> checks), motion identical;
- motion: MoveDown is MoveUp played backwards, so the frames are the same set;
- wmw: the colours swapped; red and green have equal luma, so the gray frames (hence the flow)
  are the same; and played backwards a clip is one of the other class (same set of frames);
- order: DownThenUp is UpThenDown rolled by half the clip (same frames, same velocities).
As the draws do not depend on the class, each class's distribution is its counterpart's mapped
through that bijection: whatever the map keeps (frame sets, flow, gray frames) carries no label.

Every kind has its own sprite layout (appearance: one square, motion: one disc, wmw: two
squares, order: one wide bar), visible to both streams, so the kinds never mix in an 8-way
classifier and each pair is confused only by what its kind hides. Colour (red or green, equal
luma), pattern (stripes or checks) and a fine random texture are drawn the same way for every
sprite whose class does not fix them, so no stream learns a kind from them. Motion is vertical
only and the horizontal placement is symmetric about the centre (left and right equally likely),
so the mirrored clip (random flips in training, flipped copies at test) is a clip of the same
class; `Clip.mirrored` renders it exactly.

What a network needs per pair, and what is left for the others to use:
- appearance: the pattern of a single frame. Flow sees a textured sprite moving the same way in
  both classes (stripes and checks both have vertical gradients; the texture fills them in).
- motion: the direction of motion, from flow (or from frames in time order).
- wmw: which colour moves which way; neither a frame (colours, but both directions are equally
  likely at any place) nor gray-level flow (two opposite movers, colour-blind) tells, only the
  streams combined at the same locations (ST-ResNet's cross-stream residuals).
- order: which direction comes first. Frames, per-frame velocities, the velocity histogram of
  any window length and windows away from the turn have the same distribution; a stack of L
  flows that spans the turn (about L of the T-L stack positions) does show it, as the turn is
  where the order is; temporal convolutions over chunks see it everywhere. (Exact for an even
  number of frames T; for odd T the rows match in mean only.)

The renderer is vectorised numpy (a sprite is a function of local coordinates evaluated over
its column band in all frames at once): 8 classes x 12 clips x 32 frames of 96x96 in ~4 s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

KINDS = ("appearance", "motion", "wmw", "order")
ACTION_CLASSES: dict[str, str] = {  # class name -> kind; the order of the default classInd
    "PatternStripes": "appearance",
    "PatternChecks": "appearance",
    "MoveUp": "motion",
    "MoveDown": "motion",
    "RedUpGreenDown": "wmw",
    "RedDownGreenUp": "wmw",
    "UpThenDown": "order",
    "DownThenUp": "order",
}
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # cv2 RGB2GRAY, what the flow is computed on
RED = np.array([180.0, 70.0, 70.0])
GREEN = np.array([50.0, (RED @ GRAY_WEIGHTS - 50.0 * (0.299 + 0.114)) / 0.587, 50.0])
COLOURS = {"red": RED, "green": GREEN}  # equal luma (102.9): gray frames cannot tell them apart
PATTERN_AMPLITUDE = 0.38  # luma modulation of the stripes/checks: the objects dominate
TEXTURE_AMPLITUDE = 0.10  # fine random texture on every sprite, so flow is defined everywhere
NUM_WAVES = 6  # cosines summed into that texture


def textured_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random (H, W, 3) uint8 texture: flow needs gradients everywhere."""
    coarse = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, height)
    xs = np.linspace(0, coarse.shape[1] - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Sprite:
    """One textured object: shape, colour, pattern and texture in its own coordinates, and its
    position (x fixed: motion is vertical only; y per frame, in pixel-centre coordinates)."""

    shape: str  # square, disc or bar
    half: tuple[float, float]  # half height, half width (disc: the radius twice)
    colour: str  # red or green
    pattern: str  # stripes (horizontal) or checks
    period: float  # of the pattern, px
    phase: tuple[float, float]  # of the pattern along y and x, radians
    waves: np.ndarray  # (NUM_WAVES, 3): cos(a * ly + b * lx + c) summed into the texture
    x: float  # centre column
    y: np.ndarray  # (T,) centre row per frame

    def mirrored(self, width: int) -> Sprite:
        """The same sprite seen in a horizontal mirror of a `width`-wide frame."""
        waves = self.waves * np.array([1.0, -1.0, 1.0])
        return replace(
            self, x=width - 1 - self.x, phase=(self.phase[0], -self.phase[1]), waves=waves
        )


@dataclass(frozen=True)
class Clip:
    """The ground truth of one video: its class, static background and sprites."""

    name: str  # class name
    background: np.ndarray  # (H, W, 3) float32 RGB
    sprites: tuple[Sprite, ...]

    @property
    def num_frames(self) -> int:
        return len(self.sprites[0].y)

    def mirrored(self) -> Clip:
        """The clip mirrored left-right: `render_clip` of it is the mirrored video."""
        width = self.background.shape[1]
        return replace(
            self,
            background=np.ascontiguousarray(self.background[:, ::-1]),
            sprites=tuple(s.mirrored(width) for s in self.sprites),
        )


def _square_wave(theta: np.ndarray) -> np.ndarray:
    """A smoothed square wave in [-1, 1] (even in theta): sharp pattern edges without aliasing."""
    return np.tanh(3.0 * np.cos(theta)) / np.tanh(3.0)


def _mask(shape: str, half: tuple[float, float], ly: np.ndarray, lx: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a sprite at local offsets ly (T, H, 1), lx (1, 1, w)."""
    if shape == "disc":
        return np.clip(half[0] + 0.5 - np.sqrt(ly**2 + lx**2), 0.0, 1.0)
    return np.clip(half[0] + 0.5 - np.abs(ly), 0.0, 1.0) * np.clip(
        half[1] + 0.5 - np.abs(lx), 0.0, 1.0
    )


def _luma_gain(sprite: Sprite, ly: np.ndarray, lx: np.ndarray) -> np.ndarray:
    """Per-pixel brightness factor of a sprite (pattern + texture), the same for both colours;
    clipped so no channel of either colour saturates (which would break their equal luma)."""
    k = 2 * np.pi / sprite.period
    pattern = _square_wave(k * ly + sprite.phase[0])
    if sprite.pattern == "checks":
        pattern = pattern * _square_wave(k * lx + sprite.phase[1])
    texture = sum(np.cos(a * ly + b * lx + c) for a, b, c in sprite.waves)
    gain = 1.0 + PATTERN_AMPLITUDE * pattern + TEXTURE_AMPLITUDE * texture / np.sqrt(NUM_WAVES / 2)
    return np.clip(gain, 0.45, 1.38)


def render_clip(clip: Clip) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames of `clip`: sprites composited over the background, with
    sub-pixel positions (each sprite is a function of local coordinates, so motion is smooth)."""
    height, width, _ = clip.background.shape
    frames = np.repeat(clip.background[None].astype(np.float32), clip.num_frames, axis=0)
    rows = np.arange(height, dtype=np.float64)
    for s in clip.sprites:
        x0 = max(0, int(np.floor(s.x - s.half[1] - 1)))
        x1 = min(width, int(np.ceil(s.x + s.half[1] + 2)))
        lx = (np.arange(x0, x1, dtype=np.float64) - s.x)[None, None, :]
        ly = (rows[None, :] - s.y[:, None])[:, :, None]
        alpha = _mask(s.shape, s.half, ly, lx)[..., None]
        sprite = _luma_gain(s, ly, lx)[..., None] * COLOURS[s.colour]
        band = frames[:, :, x0:x1]
        band += (alpha * (sprite - band)).astype(np.float32)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _geometry(size: tuple[int, int]) -> tuple[float, float]:
    """Sprite side and speed scale of a (width, height) frame: a quarter of the short side, and
    speeds given for a 96-px frame."""
    short = min(size)
    return max(4.0, round(short / 4)), short / 96


def _speed(size: tuple[int, int], frames: int, rng: np.random.Generator) -> float:
    """Vertical speed, px/frame: uniform in 1.5-3 for a 96-px frame (scaled with the frame), the
    top lowered so a square crossing the whole clip stays in view (32 frames of 96 px:
    1.47-2.26); the same distribution for every class, so speed tells no class from another."""
    side, scale = _geometry(size)
    room = size[1] - 2.0 - side
    top = min(3.0 * scale, room / max(frames - 1, 1))
    return float(rng.uniform(min(1.5 * scale, 0.65 * top), top))


def _linear(
    size: tuple[int, int], frames: int, half_y: float, direction: int, rng: np.random.Generator
) -> np.ndarray:
    """y per frame of a sprite moving at constant speed (direction -1 = up, +1 = down),
    symmetric in time about a random centre: the reverse direction visits the same rows."""
    v = _speed(size, frames, rng)
    tau = np.arange(frames) - (frames - 1) / 2
    reach = v * (frames - 1) / 2
    lo, hi = half_y + 0.5 + reach, size[1] - 1.5 - half_y - reach
    centre = rng.uniform(lo, max(lo, hi))
    return centre + direction * v * tau


def _there_and_back(
    size: tuple[int, int], frames: int, half_y: float, first: int, rng: np.random.Generator
) -> np.ndarray:
    """y per frame of a sprite moving `first` (-1 = up) for half the clip and back for the rest;
    the rows of the frames are symmetric about a random centre (exactly for even T), so both
    orders visit the same rows, and the two orders are each other rolled by T/2."""
    v = _speed(size, frames, rng)
    t = np.arange(frames)
    g = 0.5 - np.abs(2 * t + 1 - frames) / frames  # rises by 2/T a frame, then falls
    g = g - g.mean()
    amplitude = v * frames / 2
    reach = amplitude * np.abs(g).max()
    lo, hi = half_y + 0.5 + reach, size[1] - 1.5 - half_y - reach
    centre = rng.uniform(lo, max(lo, hi))
    return centre + first * amplitude * g


def _sprite(
    shape: str, size: tuple[int, int], rng: np.random.Generator, *, pattern: str | None = None
) -> Sprite:
    """A sprite of `shape` with random colour, pattern (unless given), texture; no position yet.

    The draws are made in the same order whatever `pattern` is, so counterparts stay aligned."""
    side, scale = _geometry(size)
    half = {
        "square": (side / 2, side / 2),
        "disc": (side / 2, side / 2),
        "bar": (0.3 * side, 0.75 * side),
    }[shape]
    colour = "red" if rng.random() < 0.5 else "green"
    drawn = "stripes" if rng.random() < 0.5 else "checks"
    period = side * rng.uniform(0.28, 0.38)
    phase = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)))
    wavelength = np.maximum(2.5, rng.uniform(3.0, 6.0, NUM_WAVES) * scale)
    angle = rng.uniform(0, np.pi, NUM_WAVES)
    waves = np.stack(
        [
            2 * np.pi * np.sin(angle) / wavelength,
            2 * np.pi * np.cos(angle) / wavelength,
            rng.uniform(0, 2 * np.pi, NUM_WAVES),
        ],
        axis=1,
    )
    return Sprite(shape, half, colour, pattern or drawn, period, phase, waves, 0.0, np.zeros(0))


def _single_x(half_x: float, width: int, rng: np.random.Generator) -> float:
    """A column for a lone sprite: left or right of the centre with equal probability."""
    side = -1.0 if rng.random() < 0.5 else 1.0
    offset = rng.uniform(0.0, max(0.0, (width - 1) / 2 - half_x - 1.5))
    return (width - 1) / 2 + side * offset


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A static, smooth, low-contrast background (flow needs some texture, the sprites lead)."""
    width, height = size
    texture = textured_background(height, width, rng).astype(np.float32)
    level = rng.uniform(85.0, 115.0)
    return (level + 0.15 * (texture - 127.5)).astype(np.float32)


def sample_clip(name: str, rng: np.random.Generator, *, frames: int, size: tuple[int, int]) -> Clip:
    """Draw a clip of class `name` ((width, height) frames). Both classes of a kind make the same
    draws in the same order; the class only decides one choice (see the module docstring)."""
    kind = ACTION_CLASSES[name]
    background = _background(size, rng)
    width = size[0]
    if kind == "appearance":
        pattern = "stripes" if name == "PatternStripes" else "checks"
        s = _sprite("square", size, rng, pattern=pattern)
        direction = -1 if rng.random() < 0.5 else 1
        y = _linear(size, frames, s.half[0], direction, rng)
        sprites = (replace(s, x=_single_x(s.half[1], width, rng), y=y),)
    elif kind == "motion":
        s = _sprite("disc", size, rng)
        y = _linear(size, frames, s.half[0], -1 if name == "MoveUp" else 1, rng)
        sprites = (replace(s, x=_single_x(s.half[1], width, rng), y=y),)
    elif kind == "order":
        s = _sprite("bar", size, rng)
        y = _there_and_back(size, frames, s.half[0], -1 if name == "UpThenDown" else 1, rng)
        sprites = (replace(s, x=_single_x(s.half[1], width, rng), y=y),)
    else:
        sprites = _what_moves_where(name, size, frames, rng)
    return Clip(name, background, sprites)


def _what_moves_where(
    name: str, size: tuple[int, int], frames: int, rng: np.random.Generator
) -> tuple[Sprite, Sprite]:
    """Two squares, one left and one right of the centre, moving in opposite vertical directions;
    which side moves up is random, the class decides only which colour moves up."""
    width = size[0]
    up, down = _sprite("square", size, rng), _sprite("square", size, rng)
    half_x = up.half[1]
    up_left = rng.random() < 0.5
    free = max(half_x + 1.0, (width - 1) / 2 - half_x - 1.5)
    offsets = rng.uniform(half_x + 1.0, free, 2)
    centre = (width - 1) / 2
    x_up, x_down = (
        (centre - offsets[0], centre + offsets[1])
        if up_left
        else (centre + offsets[0], centre - offsets[1])
    )
    y_up = _linear(size, frames, up.half[0], -1, rng)
    y_down = _linear(size, frames, down.half[0], 1, rng)
    colour_up = "red" if name == "RedUpGreenDown" else "green"
    colour_down = "green" if colour_up == "red" else "red"
    return (
        replace(up, colour=colour_up, x=x_up, y=y_up),
        replace(down, colour=colour_down, x=x_down, y=y_down),
    )
