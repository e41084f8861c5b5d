"""A procedural MVTec-style set: textures and objects with drawn defects and exact masks.

Images are generated deterministically from the params (per image, from ``seed``, the category,
the side and the index) into ``<cache_root()>/synthetic/<hash of params>/`` as PNG files in the
MVTec AD layout, then read back through the ``mvtec`` loader (and its decode cache). A category
is generated into a temporary folder and renamed into place, so concurrent workers are safe.

Categories (defect types):
  weave   colour woven texture        (scratch, stain, hole)
  granite grey stone texture          (crack, spot, smear)
  disc    colour round part with print (bite, spot, crack, missing_print)
  chip    colour IC package with pins  (missing_pin, bent_pin, scratch)
Normal images vary in pose, phase, colour and lighting; defect strength and size are drawn from
ranges that include subtle cases, so the set is learnable but not trivially separable. A mask
marks the pixels a defect covers by at least one half, and every pixel the defect changed.
``defect_scale`` multiplies every drawn extent of a defect (radii, lengths, line widths; a missing
print or pin keeps its size) after the same random draws, so scale 1 gives the ranges above and
another scale the same defects, at the same places, larger or smaller: small images seen through
coarse features (a random-init backbone at 64 px) need larger defects than 1-2 px lines.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pydantic import Field, field_validator
from scipy.ndimage import gaussian_filter, zoom

from data.base import DatasetParams, Statistics, register_dataset
from data.cache import cache_root
from data.datasets.mvtec import MVTec

GENERATOR_VERSION = 4
Canvas = np.ndarray  # H×W×C float32 in 0..255
Defect = Callable[[np.random.Generator, Canvas, dict], tuple[Canvas, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# drawing primitives (analytic shapes with one-pixel anti-aliasing; coverage in 0..1)

@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), read-only."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def windowed(size: int, y_range: tuple[float, float], x_range: tuple[float, float],
             shape: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """A full-size coverage map, evaluating ``shape(yy, xx)`` only inside the given box."""
    cover = np.zeros((size, size), dtype=np.float32)
    y0, y1 = max(0, int(y_range[0]) - 1), min(size, int(np.ceil(y_range[1])) + 1)
    x0, x1 = max(0, int(x_range[0]) - 1), min(size, int(np.ceil(x_range[1])) + 1)
    if y0 < y1 and x0 < x1:
        yy, xx = grid(size)
        cover[y0:y1, x0:x1] = shape(yy[y0:y1, x0:x1], xx[y0:y1, x0:x1])
    return cover


def around(centre: float, reach: float) -> tuple[float, float]:
    return centre - reach, centre + reach


def disc_cover(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    return windowed(size, around(cy, radius + 1), around(cx, radius + 1),
                    lambda yy, xx: np.clip(radius - np.hypot(yy - cy, xx - cx) + 0.5, 0.0, 1.0))


def ellipse_cover(size: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    def shape(yy, xx):
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        return np.clip((1.0 - np.hypot(u / rx, v / ry)) * min(rx, ry) + 0.5, 0.0, 1.0)

    reach = max(rx, ry) + 1
    return windowed(size, around(cy, reach), around(cx, reach), shape)


def rect_cover(size: int, cy: float, cx: float, half_h: float, half_w: float, angle: float) -> np.ndarray:
    def shape(yy, xx):
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        return np.clip(half_w - np.abs(u) + 0.5, 0, 1) * np.clip(half_h - np.abs(v) + 0.5, 0, 1)

    reach = np.hypot(half_h, half_w) + 1
    return windowed(size, around(cy, reach), around(cx, reach), shape)


def polyline_cover(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Coverage of a polyline (points: K×2 as (y, x)) drawn ``width`` pixels wide."""
    def shape(yy, xx):
        dist = np.full(yy.shape, np.inf, dtype=np.float32)
        for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
            dy, dx = y1 - y0, x1 - x0
            t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
            dist = np.minimum(dist, np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)))
        return np.clip(width / 2 - dist + 0.5, 0.0, 1.0)

    reach = width / 2 + 1
    return windowed(size, (points[:, 0].min() - reach, points[:, 0].max() + reach),
                    (points[:, 1].min() - reach, points[:, 1].max() + reach), shape)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise (wide filters run at a reduced resolution)."""
    step = max(1, int(sigma // 2))
    cells = -(-size // step)
    noise = gaussian_filter(rng.standard_normal((cells, cells)).astype(np.float32), sigma / step, mode="wrap")
    if step > 1:
        noise = zoom(noise, size / cells, order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    return noise / (noise.std() + 1e-6)


def paint(canvas: Canvas, cover: np.ndarray, colour) -> Canvas:
    """``colour`` blended over ``canvas`` by ``cover``, touching only the cover's bounding box."""
    rows, cols = np.flatnonzero(cover.any(axis=1)), np.flatnonzero(cover.any(axis=0))
    out = canvas.copy()
    if len(rows):
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        alpha = cover[box][..., None]
        out[box] = canvas[box] * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    return out


def random_segment(rng: np.random.Generator, size: int, length: tuple[float, float],
                   centre: tuple[float, float] | None = None, spread: float = 0.3,
                   scale: float = 1.0) -> np.ndarray:
    cy, cx = centre or (size / 2, size / 2)
    mid = np.array([cy, cx]) + rng.uniform(-spread, spread, 2) * size
    half = rng.uniform(*length) * size / 2 * scale
    angle = rng.uniform(0, np.pi)
    step = half * np.array([np.sin(angle), np.cos(angle)])
    return np.stack([mid - step, mid + step])


def random_walk(rng: np.random.Generator, size: int, steps: int, step_len: float) -> np.ndarray:
    point = rng.uniform(0.25, 0.75, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    points = [point]
    for _ in range(steps):
        heading += rng.normal(0, 0.5)
        point = point + step_len * np.array([np.sin(heading), np.cos(heading)])
        points.append(point)
    return np.stack(points)


def line_width(rng: np.random.Generator, ctx: dict) -> float:
    """A scratch / crack width: 1.5..2.5 px at 96 px, scaled with the image size and defect scale."""
    return rng.uniform(1.5, 2.5) * ctx["size"] / 96 * ctx.get("scale", 1.0)


def extent(ctx: dict, value):
    """A drawn defect extent (radius, length) times the defect scale."""
    return value * ctx.get("scale", 1.0)


def as_mask(cover: np.ndarray) -> np.ndarray:
    return cover >= 0.5


def random_sign(rng: np.random.Generator) -> float:
    return float(rng.choice([-1.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# categories: normal(rng, size) -> (canvas, context); defects: name -> fn(rng, canvas, context)

def weave_normal(rng, size):
    angle = np.deg2rad(rng.uniform(-4, 4))
    period = size / 8 * rng.uniform(0.95, 1.05)
    yy, xx = grid(size)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    pattern = (np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
               * np.sin(2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)))
    base = np.array([150, 118, 88], dtype=np.float32) + rng.normal(0, 6, 3)
    light = 1 + 0.06 * smooth_noise(rng, size, size / 6)
    canvas = base * (0.82 + 0.18 * pattern)[..., None] * light[..., None]
    canvas += rng.normal(0, 5, canvas.shape)
    return canvas, {"size": size, "base": base}


def weave_scratch(rng, canvas, ctx):
    size = ctx["size"]
    cover = polyline_cover(size, random_segment(rng, size, (0.15, 0.45), scale=ctx.get("scale", 1.0)),
                           line_width(rng, ctx))
    shift = random_sign(rng) * rng.uniform(40, 70)
    return paint(canvas, cover, ctx["base"] + shift), as_mask(cover)


def weave_stain(rng, canvas, ctx):
    size = ctx["size"]
    cover = ellipse_cover(size, *rng.uniform(0.2, 0.8, 2) * size, *extent(ctx, rng.uniform(0.06, 0.12, 2) * size),
                          rng.uniform(0, np.pi))
    tint = np.array([90, 60, 40], dtype=np.float32) + rng.normal(0, 20, 3)
    strength = rng.uniform(0.5, 0.8)
    return paint(canvas, cover * strength, tint), as_mask(cover)


def weave_hole(rng, canvas, ctx):
    size = ctx["size"]
    cover = ellipse_cover(size, *rng.uniform(0.2, 0.8, 2) * size, *extent(ctx, rng.uniform(0.05, 0.09, 2) * size),
                          rng.uniform(0, np.pi))
    hole = ctx["base"] * rng.uniform(0.45, 0.7) + rng.normal(0, 3, canvas.shape)
    return canvas * (1 - cover[..., None]) + hole * cover[..., None], as_mask(cover)


def granite_normal(rng, size):
    level = rng.uniform(115, 140)
    fine, mid, coarse = (smooth_noise(rng, size, s) for s in (0.8, 2.5, size / 10))
    canvas = level + 12 * fine + 12 * mid + 10 * coarse
    return canvas[..., None].astype(np.float32), {"size": size, "level": level}


def granite_crack(rng, canvas, ctx):
    size = ctx["size"]
    cover = polyline_cover(size, random_walk(rng, size, int(rng.integers(4, 9)),
                                             extent(ctx, size * rng.uniform(0.04, 0.07))),
                           line_width(rng, ctx))
    return paint(canvas, cover * rng.uniform(0.7, 1.0), [ctx["level"] - 80]), as_mask(cover)


def granite_spot(rng, canvas, ctx):
    size = ctx["size"]
    cover = ellipse_cover(size, *rng.uniform(0.2, 0.8, 2) * size, *extent(ctx, rng.uniform(0.04, 0.08, 2) * size),
                          rng.uniform(0, np.pi))
    shift = random_sign(rng) * rng.uniform(40, 70)
    return canvas + (cover * shift)[..., None], as_mask(cover)


def granite_smear(rng, canvas, ctx):
    size = ctx["size"]
    cover = ellipse_cover(size, *rng.uniform(0.25, 0.75, 2) * size, *extent(ctx, rng.uniform(0.08, 0.14, 2) * size),
                          rng.uniform(0, np.pi))
    smeared = gaussian_filter(canvas[..., 0], rng.uniform(2.0, 3.5))[..., None] + random_sign(rng) * rng.uniform(30, 50)
    return canvas * (1 - cover[..., None]) + smeared * cover[..., None], as_mask(cover)


def disc_normal(rng, size):
    background = np.array([45, 45, 50], dtype=np.float32) + rng.normal(0, 3, 3)
    canvas = np.broadcast_to(background, (size, size, 3)).astype(np.float32).copy()
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    radius = size * 0.32 * rng.uniform(0.98, 1.02)
    colour = np.array([205, 170, 70], dtype=np.float32) + rng.normal(0, 5, 3)
    body = disc_cover(size, cy, cx, radius)
    yy, xx = grid(size)
    shade = 1 - 0.25 * np.hypot(yy - cy + radius * 0.3, xx - cx + radius * 0.3) / radius
    canvas = canvas * (1 - body[..., None]) + (colour * shade[..., None]) * body[..., None]
    angle = np.deg2rad(rng.uniform(-25, 25))
    py, px = cy - 0.35 * radius * np.cos(angle), cx + 0.35 * radius * np.sin(angle)
    printed = rect_cover(size, py, px, radius * 0.09, radius * 0.4, angle)
    canvas = paint(canvas, printed, [60, 40, 30])
    canvas += rng.normal(0, 4, canvas.shape)
    return canvas, {"size": size, "cy": cy, "cx": cx, "radius": radius, "body": body, "colour": colour,
                    "background": background, "print": printed}


def disc_bite(rng, canvas, ctx):
    size, radius = ctx["size"], ctx["radius"]
    angle = rng.uniform(0, 2 * np.pi)
    cover = disc_cover(size, ctx["cy"] + radius * np.sin(angle), ctx["cx"] + radius * np.cos(angle),
                       extent(ctx, radius * rng.uniform(0.08, 0.18))) * ctx["body"]
    fill = ctx["background"] + rng.normal(0, 4, canvas.shape)
    return canvas * (1 - cover[..., None]) + fill * cover[..., None], as_mask(cover)


def disc_spot(rng, canvas, ctx):
    size, radius = ctx["size"], ctx["radius"]
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.75) * radius
    cover = disc_cover(size, ctx["cy"] + dist * np.sin(angle), ctx["cx"] + dist * np.cos(angle),
                       extent(ctx, size * rng.uniform(0.02, 0.05)))
    tint = ctx["colour"] * rng.uniform(0.55, 0.85)
    return paint(canvas, cover, tint), as_mask(cover)


def disc_crack(rng, canvas, ctx):
    size = ctx["size"]
    line = random_segment(rng, size, (0.1, 0.3), centre=(ctx["cy"], ctx["cx"]), spread=0.12,
                          scale=ctx.get("scale", 1.0))
    cover = polyline_cover(size, line, line_width(rng, ctx)) * ctx["body"]
    return paint(canvas, cover * rng.uniform(0.6, 1.0), [70, 55, 30]), as_mask(cover)


def disc_missing_print(rng, canvas, ctx):
    cover = np.clip(gaussian_filter(ctx["print"], 0.7, truncate=2.0) * 1.5, 0, 1) * ctx["body"]
    fill = ctx["colour"] * 0.9 + rng.normal(0, 4, canvas.shape)
    return canvas * (1 - cover[..., None]) + fill * cover[..., None], as_mask(cover)


def chip_normal(rng, size):
    background = np.array([35, 95, 45], dtype=np.float32) + rng.normal(0, 4, 3)
    canvas = np.broadcast_to(background, (size, size, 3)).astype(np.float32).copy()
    canvas *= (1 + 0.05 * smooth_noise(rng, size, size / 5))[..., None]
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    angle = np.deg2rad(rng.uniform(-3, 3))
    half_h, half_w = 0.15 * size, 0.24 * size
    pin_colour = np.array([190, 190, 185], dtype=np.float32) + rng.normal(0, 5, 3)
    pins = []
    for row in (-1, 1):
        for k in range(5):
            u = (k - 2) * half_w * 0.4
            v = row * (half_h + 0.04 * size)
            py = cy + u * np.sin(angle) + v * np.cos(angle)
            px = cx + u * np.cos(angle) - v * np.sin(angle)
            pins.append((py, px))
    pin_half = (0.045 * size, 0.02 * size)
    for py, px in pins:
        canvas = paint(canvas, rect_cover(size, py, px, *pin_half, angle), pin_colour)
    body = rect_cover(size, cy, cx, half_h, half_w, angle)
    canvas = paint(canvas, body, np.array([30, 30, 32]) + rng.normal(0, 2, 3))
    mark_y = cy - 0.6 * half_h * np.cos(angle) - 0.75 * half_w * np.sin(angle)
    mark_x = cx - 0.75 * half_w * np.cos(angle) + 0.6 * half_h * np.sin(angle)
    canvas = paint(canvas, disc_cover(size, mark_y, mark_x, 0.025 * size), [120, 120, 120])
    canvas += rng.normal(0, 4, canvas.shape)
    return canvas, {"size": size, "pins": pins, "pin_half": pin_half, "angle": angle, "body": body,
                    "background": background, "pin_colour": pin_colour, "cy": cy, "cx": cx}


def chip_missing_pin(rng, canvas, ctx):
    size = ctx["size"]
    py, px = ctx["pins"][int(rng.integers(len(ctx["pins"])))]
    cover = rect_cover(size, py, px, ctx["pin_half"][0] + 0.5, ctx["pin_half"][1] + 0.5, ctx["angle"])
    cover = cover * (1 - ctx["body"])
    fill = ctx["background"] + rng.normal(0, 4, canvas.shape)
    return canvas * (1 - cover[..., None]) + fill * cover[..., None], as_mask(cover)


def chip_bent_pin(rng, canvas, ctx):
    size = ctx["size"]
    py, px = ctx["pins"][int(rng.integers(len(ctx["pins"])))]
    old = rect_cover(size, py, px, ctx["pin_half"][0] + 0.5, ctx["pin_half"][1] + 0.5, ctx["angle"])
    old = old * (1 - ctx["body"])
    fill = ctx["background"] + rng.normal(0, 4, canvas.shape)
    canvas = canvas * (1 - old[..., None]) + fill * old[..., None]
    sign = -1.0 if py < ctx["cy"] else 1.0
    tilt = random_sign(rng) * rng.uniform(0.35, 0.8)
    shift = ctx["pin_half"][0] * np.sin(tilt)
    new = rect_cover(size, py + sign * ctx["pin_half"][0] * (1 - np.cos(tilt)) * 0.5, px + sign * shift * 0.8,
                     *ctx["pin_half"], ctx["angle"] + tilt) * (1 - ctx["body"])
    canvas = paint(canvas, new, ctx["pin_colour"])
    return canvas, as_mask(np.maximum(old, new))


def chip_scratch(rng, canvas, ctx):
    size = ctx["size"]
    line = random_segment(rng, size, (0.1, 0.3), centre=(ctx["cy"], ctx["cx"]), spread=0.08,
                          scale=ctx.get("scale", 1.0))
    cover = polyline_cover(size, line, line_width(rng, ctx)) * ctx["body"]
    return paint(canvas, cover * rng.uniform(0.6, 1.0), [170, 170, 170]), as_mask(cover)


CATEGORIES: dict[str, tuple[Callable, dict[str, Defect]]] = {
    "weave": (weave_normal, {"scratch": weave_scratch, "stain": weave_stain, "hole": weave_hole}),
    "granite": (granite_normal, {"crack": granite_crack, "spot": granite_spot, "smear": granite_smear}),
    "disc": (disc_normal, {"bite": disc_bite, "spot": disc_spot, "crack": disc_crack,
                           "missing_print": disc_missing_print}),
    "chip": (chip_normal, {"missing_pin": chip_missing_pin, "bent_pin": chip_bent_pin,
                           "scratch": chip_scratch}),
}


# ---------------------------------------------------------------------------------------------
# generation into the MVTec layout

class SyntheticParams(DatasetParams):
    categories: list[str] = Field(default_factory=lambda: list(CATEGORIES))
    n_train: int = Field(48, ge=1)
    n_test_good: int = Field(16, ge=1)
    n_test_defect: int = Field(24, ge=1)
    image_size: int = Field(96, ge=32, le=512)
    defect_scale: float = Field(1.0, gt=0, le=4)
    seed: int = 0

    @field_validator("categories")
    @classmethod
    def known_categories(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CATEGORIES]
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(f"categories must be distinct names from {list(CATEGORIES)}; got {value}")
        return value


def to_uint8(canvas: Canvas) -> np.ndarray:
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, compress_level=1)


def image_rng(seed: int, category: str, side: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(side.encode()), index])


def draw_defect(rng: np.random.Generator, normal: Callable, defect: Defect, size: int,
                attempts: int = 10, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A defect image and its mask: the defect's half-covered pixels plus every pixel it changed.
    A draw that changes nothing (clipped away) is drawn again from the same stream. ``scale``: the
    defect scale (see the module doc)."""
    canvas, ctx = normal(rng, size)
    ctx["scale"] = scale
    before = to_uint8(canvas)
    for _ in range(attempts):
        drawn, mask = defect(rng, canvas, ctx)
        pixels = to_uint8(drawn)
        changed = pixels != before
        mask = mask | (changed.any(axis=-1) if changed.ndim == 3 else changed)
        if changed.any():
            return pixels, mask
    raise RuntimeError(f"defect {defect.__name__} changed no pixel in {attempts} draws")


def generate_category(folder: Path, category: str, params: SyntheticParams) -> None:
    """Write one category's PNG files (MVTec layout) under ``folder``."""
    normal, defects = CATEGORIES[category]
    size = params.image_size
    for side, count in (("train", params.n_train), ("test", params.n_test_good)):
        for i in range(count):
            canvas, _ = normal(image_rng(params.seed, category, side, i), size)
            save_png(folder / side / "good" / f"{i:03d}.png", to_uint8(canvas))
    names = list(defects)
    counters = dict.fromkeys(names, 0)
    for i in range(params.n_test_defect):
        rng = image_rng(params.seed, category, "defect", i)
        name = names[i % len(names)]
        pixels, mask = draw_defect(rng, normal, defects[name], size, scale=params.defect_scale)
        stem = f"{counters[name]:03d}"
        counters[name] += 1
        save_png(folder / "test" / name / f"{stem}.png", pixels)
        save_png(folder / "ground_truth" / name / f"{stem}_mask.png", mask.astype(np.uint8) * 255)


def params_hash(params: SyntheticParams) -> str:
    payload = json.dumps([GENERATOR_VERSION, params.model_dump()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_generated(params: SyntheticParams, categories: list[str]) -> Path:
    """The generated root for ``params``; missing categories are generated first (atomically)."""
    root = cache_root() / "synthetic" / params_hash(params)
    for category in categories:
        final = root / category
        if final.is_dir():
            continue
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{category}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            generate_category(tmp, category, params)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@register_dataset("synthetic")
class Synthetic(MVTec):
    """Procedural categories (see the module doc), read back through the MVTec loader."""

    Params = SyntheticParams
    statistics = Statistics()  # MVTec AD's constants are for its own images

    def root(self) -> Path:
        return cache_root() / "synthetic" / params_hash(self.params)

    def classes(self) -> list[str]:
        return list(self.params.categories)

    def records(self, category, side):
        ensure_generated(self.params, [category])
        return super().records(category, side)
