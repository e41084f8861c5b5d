"""Decode cache: image files -> memory-mapped ``.npy`` arrays, decoded once per machine.

An entry lives in ``<cache_root()>/decoded/<ident>-<stamp>/`` where ``ident`` hashes the file paths
and ``stamp`` their sizes and modification times, so a changed file gives a new entry (the stale
one is deleted). An entry is built in a temporary folder and renamed into place, so concurrent
workers never see half an entry; the loser of a race discards its copy. Arrays come back read-only
(``np.load(mmap_mode="r")``): an N×H×W×C array when every image has one size, else a list of
H×W×C views. Images whose files are all grey get C = 1; a mix of grey and colour gets C = 3.

High-bit-depth grey images are scaled to 8 bits by their type's full range (Pillow's ``convert``
would clip them at 255): unsigned 16-bit (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, or
``I`` read from raw ``I;16*`` data) keep their high byte (``v >> 8``, as Pillow itself decodes 16-bit
RGB PNGs); 32-bit float (``F``) must lie in [0, 1] and becomes ``round(255 v)``. Signed or 32-bit
integer images and float images outside [0, 1] (or with NaN) are refused with a ``DataError``
naming the file. Masks of these modes mark every non-zero pixel.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data.base import DataError

FORMAT_VERSION = 2  # 2: high-bit-depth images scaled, not clipped
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
UINT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
HIGH_BIT_MODES = UINT16_MODES | {"I", "F"}
GREY_MODES = frozenset({"1", "L", "LA"}) | HIGH_BIT_MODES


def cache_root() -> Path:
    """``$ADGRID_CACHE``, else ``~/.cache/adgrid``."""
    return Path(os.environ.get("ADGRID_CACHE") or "~/.cache/adgrid").expanduser()


def decoded_dir() -> Path:
    return cache_root() / "decoded"


@dataclass
class Decoded:
    """images: N×H×W×C uint8 (or list); masks: N×H×W {0,1} (or list, or None);
    entry: the cache entry's name, which changes whenever any input file changes; hit: reused."""

    images: np.ndarray | list
    masks: np.ndarray | list | None
    entry: str
    hit: bool


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def _stat(path: Path, what: str) -> list[int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{what} file {path} cannot be read: {exc.strerror or exc}") from None
    return [st.st_size, st.st_mtime_ns]


def entry_name(image_paths: Sequence[Path], mask_paths: Sequence[Path | None] | None = None) -> str:
    """The entry's name for these files in their current state (stats every file, reads none)."""
    masks = list(mask_paths) if mask_paths is not None else None
    ident = _digest([FORMAT_VERSION, [str(p) for p in image_paths],
                     None if masks is None else [m and str(m) for m in masks]])
    stats = [_stat(Path(p), "image") for p in image_paths]
    if masks is not None:
        stats += [_stat(Path(m), "mask") for m in masks if m is not None]
    return f"{ident}-{_digest(stats)}"


def decode_files(image_paths: Sequence[Path], mask_paths: Sequence[Path | None] | None = None) -> Decoded:
    """Decoded images (and binary masks; ``None`` in ``mask_paths`` = all-zero mask) via the cache."""
    image_paths = [Path(p) for p in image_paths]
    if not image_paths:
        raise ValueError("decode_files needs at least one image")
    if mask_paths is not None:
        mask_paths = [None if m is None else Path(m) for m in mask_paths]
        if len(mask_paths) != len(image_paths):
            raise ValueError("mask_paths must match image_paths one to one")
    entry = entry_name(image_paths, mask_paths)
    final = decoded_dir() / entry
    if final.is_dir():
        try:
            return Decoded(*_read_entry(final, mask_paths is not None), entry=entry, hit=True)
        except (OSError, ValueError):
            shutil.rmtree(final, ignore_errors=True)  # damaged entry: rebuild it
    _build_entry(final, image_paths, mask_paths)
    _prune_stale(final)
    return Decoded(*_read_entry(final, mask_paths is not None), entry=entry, hit=False)


# ---------------------------------------------------------------------------------------------
# reading an entry

def _read_array(folder: Path, name: str) -> np.ndarray | list:
    data = np.load(folder / f"{name}.npy", mmap_mode="r")
    shapes_file = folder / f"{name}_shapes.npy"
    if not shapes_file.exists():
        return data
    views, offset = [], 0
    for shape in np.load(shapes_file):
        size = int(np.prod(shape))
        views.append(data[offset:offset + size].reshape(tuple(int(s) for s in shape)))
        offset += size
    if offset != data.shape[0]:
        raise ValueError(f"decode cache entry {folder} is inconsistent")
    return views


def _read_entry(folder: Path, with_masks: bool):
    images = _read_array(folder, "images")
    masks = _read_array(folder, "masks") if with_masks else None
    return images, masks


# ---------------------------------------------------------------------------------------------
# building an entry

def _open(path: Path, what: str) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None


def _header(path: Path, what: str) -> tuple[int, int, str]:
    with _open(path, what) as img:
        width, height = img.size
        return height, width, img.mode


def _raw_mode(img: Image.Image) -> str | None:
    """The raw mode of the file's pixel data (e.g. 'I;16B', 'I;32S'), read before ``load()``."""
    if not img.tile:
        return None
    args = img.tile[0][3]
    return args if isinstance(args, str) else (args[0] if args else None)


def _high_bit_grey(img: Image.Image, raw_mode: str | None, path: Path, what: str) -> np.ndarray:
    """A high-bit-depth grey image (mode in HIGH_BIT_MODES) as H×W uint8, scaled by its type's range."""
    values = np.asarray(img)
    if img.mode in UINT16_MODES or (img.mode == "I" and raw_mode in UINT16_MODES):
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    if img.mode == "F":
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both comparisons
            raise DataError(f"cannot decode {what} {path}: 32-bit float image with values in [{lo:g}, {hi:g}]; "
                            "float images must hold values in [0, 1] (save it as 8- or 16-bit instead)")
        return np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)
    raise DataError(f"cannot decode {what} {path}: {raw_mode or img.mode} integer images (signed or 32-bit) "
                    "are not supported; save it as an 8- or 16-bit unsigned PNG or TIFF")


def _pixels(path: Path, mode: str, what: str) -> np.ndarray:
    """H×W (mode 'L') or H×W×3 (mode 'RGB') uint8 pixels of an image file."""
    with _open(path, what) as img:
        raw_mode = _raw_mode(img)
        try:
            img.load()
            if img.mode not in HIGH_BIT_MODES:
                return np.asarray(img.convert(mode))
        except Exception as exc:  # decoders raise OSError, zlib.error, SyntaxError...
            raise DataError(f"cannot decode {what} {path}: {exc}") from None
        grey = _high_bit_grey(img, raw_mode, path, what)
        return grey if mode == "L" else np.repeat(grey[..., None], 3, axis=-1)


def _mask_pixels(path: Path) -> np.ndarray:
    """H×W {0,1} uint8: 1 where the mask file is non-zero (any bit depth)."""
    with _open(path, "mask") as img:
        try:
            img.load()
            values = np.asarray(img) if img.mode in HIGH_BIT_MODES else np.asarray(img.convert("L"))
        except Exception as exc:
            raise DataError(f"cannot decode mask {path}: {exc}") from None
        return (values != 0).astype(np.uint8)


class _Slots:
    """A new .npy file holding N arrays: one N×shape block if all shapes agree, else flattened."""

    def __init__(self, folder: Path, name: str, shapes: list[tuple[int, ...]], fill: int = 0):
        self.uniform = len(set(shapes)) == 1
        self.shapes = shapes
        if self.uniform:
            self.array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8,
                                                   shape=(len(shapes), *shapes[0]))
        else:
            sizes = [int(np.prod(s)) for s in shapes]
            self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self.array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8,
                                                   shape=(int(self.offsets[-1]),))
            np.save(folder / f"{name}_shapes.npy", np.asarray(shapes, dtype=np.int64))

    def __setitem__(self, index: int, value: np.ndarray) -> None:
        if self.uniform:
            self.array[index] = value
        else:
            self.array[self.offsets[index]:self.offsets[index + 1]] = value.reshape(-1)

    def close(self) -> None:
        self.array.flush()
        del self.array


def _build_entry(final: Path, image_paths: list[Path], mask_paths: list[Path | None] | None) -> None:
    headers = [_header(p, "image") for p in image_paths]
    if mask_paths is not None:
        for path, mask, (height, width, _) in zip(image_paths, mask_paths, headers):
            if mask is None:
                continue
            mask_h, mask_w, _ = _header(mask, "mask")
            if (mask_h, mask_w) != (height, width):
                raise DataError(f"mask {mask} is {mask_w}x{mask_h} but its image {path} is {width}x{height}")
    channels = 1 if all(mode in GREY_MODES for _, _, mode in headers) else 3
    pil_mode = "L" if channels == 1 else "RGB"

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images = _Slots(tmp, "images", [(h, w, channels) for h, w, _ in headers])
        masks = (_Slots(tmp, "masks", [(h, w) for h, w, _ in headers])
                 if mask_paths is not None else None)

        def decode_one(i: int) -> None:
            images[i] = _pixels(image_paths[i], pil_mode, "image").reshape(images.shapes[i])
            if masks is not None and mask_paths[i] is not None:
                masks[i] = _mask_pixels(mask_paths[i])

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(decode_one, range(len(image_paths))))  # re-raises the first error
        images.close()
        if masks is not None:
            masks.close()
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another worker won the race: use its entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune_stale(final: Path) -> None:
    """Delete older entries of the same files (same ident, other stamp); safe while mapped."""
    ident = final.name.split("-")[0]
    for other in final.parent.glob(f"{ident}-*"):
        if other != final:
            shutil.rmtree(other, ignore_errors=True)
