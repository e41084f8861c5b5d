"""Writers of small datasets in their real on-disk formats, for the data-layer tests.

Every image's pixels encode where it came from (class and index), so tests can check that the
loaders keep images, targets and masks aligned.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def coded_images(targets: np.ndarray, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """Image i is filled with (offset + 7 * target + i) % 256, its top-left pixel with the target."""
    images = np.empty((len(targets), *shape), dtype=np.uint8)
    for i, t in enumerate(targets):
        images[i] = (offset + 7 * int(t) + i) % 256
        images[i, 0, 0] = t
    return images


def balanced_targets(n_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def to_cifar_rows(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 -> N×3072 (channel planes, as in the CIFAR python batches)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_t = balanced_targets(10, train_per_class, 0)
    test_t = balanced_targets(10, test_per_class, 1)
    train = coded_images(train_t, (32, 32, 3))
    test = coded_images(test_t, (32, 32, 3), offset=100)
    for b, part in enumerate(np.array_split(np.arange(len(train_t)), 5), start=1):
        _pickle(folder / f"data_batch_{b}", {"data": to_cifar_rows(train[part]), "labels": train_t[part].tolist()})
    _pickle(folder / "test_batch", {"data": to_cifar_rows(test), "labels": test_t.tolist()})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES})
    return {"train": (train, train_t), "test": (test, test_t)}


def write_cifar100(root: Path, fine_names: list[str], coarse_names: list[str], per_side: tuple[int, int] = (200, 100)) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for side, n, seed in (("train", per_side[0], 2), ("test", per_side[1], 3)):
        fine = np.random.default_rng(seed).integers(0, 100, n)
        coarse = fine % 20
        images = coded_images(fine, (32, 32, 3))
        _pickle(folder / side, {"data": to_cifar_rows(images), "fine_labels": fine.tolist(),
                                "coarse_labels": coarse.tolist()})
        out[side] = (images, fine, coarse)
    _pickle(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, folder_name: str = "MNIST", train_per_class: int = 3, test_per_class: int = 2) -> dict:
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    out = {}
    for side, prefix, per_class, seed in (("train", "train", train_per_class, 4), ("test", "t10k", test_per_class, 5)):
        targets = balanced_targets(10, per_class, seed)
        images = coded_images(targets, (28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", targets)
        out[side] = (images, targets)
    return out


def write_svhn(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for side, per_class, seed in (("train", train_per_class, 6), ("test", test_per_class, 7)):
        targets = balanced_targets(10, per_class, seed)
        images = coded_images(targets, (32, 32, 3))
        images[:, 1, 0, :] = 200  # an orientation marker: row 1, column 0
        svhn_labels = np.where(targets == 0, 10, targets).astype(np.uint8)[:, None]
        scipy.io.savemat(root / f"{side}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": svhn_labels})
        out[side] = (images, targets)
    return out


def save_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def defect_image(size: tuple[int, int], channels: int, value: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image filled with ``value`` and a 255 box (y0, x0, y1, x1), and the box's 0/255 mask."""
    h, w = size
    image = np.full((h, w, channels) if channels == 3 else (h, w), value, dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    y0, x0, y1, x1 = box
    image[y0:y1, x0:x1] = 255
    mask[y0:y1, x0:x1] = 255
    return image, mask


def write_mvtec_category(root: Path, category: str, size: tuple[int, int] = (24, 20), channels: int = 3,
                         n_train: int = 4, n_good: int = 2, defects: dict[str, int] | None = None) -> None:
    """MVTec layout: train/good, test/good, test/<defect> with ground_truth/<defect>/<name>_mask.png."""
    defects = {"scratch": 2, "hole": 1} if defects is None else defects
    base = root / category
    shape = (*size, channels) if channels == 3 else size
    for i in range(n_train):
        save_png(base / "train" / "good" / f"{i:03d}.png", np.full(shape, 10 + i, dtype=np.uint8))
    for i in range(n_good):
        save_png(base / "test" / "good" / f"{i:03d}.png", np.full(shape, 50 + i, dtype=np.uint8))
    for d, (defect, count) in enumerate(defects.items()):
        for i in range(count):
            box = (1 + i, 2 + d, 5 + i, 7 + d)
            image, mask = defect_image(size, channels, 100 + 10 * d + i, box)
            save_png(base / "test" / defect / f"{i:03d}.png", image)
            save_png(base / "ground_truth" / defect / f"{i:03d}_mask.png", mask)


def write_fcdd(root: Path, name: str, sizes: list[tuple[int, int]], n_normal: int = 2, n_anomalous: int = 2,
               masks: bool = True, train_subfolder: bool = False) -> None:
    """FCDD layout; train image i has size sizes[i % len(sizes)]."""
    train = root / "train" / name / ("normal" if train_subfolder else "")
    for i, size in enumerate(sizes):
        save_png(train / f"t{i}.png", np.full((*size, 3), 20 + i, dtype=np.uint8))
    for i in range(n_normal):
        save_png(root / "test" / name / "normal" / f"n{i}.png", np.full((*sizes[0], 3), 60 + i, dtype=np.uint8))
    for i in range(n_anomalous):
        image, mask = defect_image(sizes[0], 3, 90 + i, (0, 0, 3 + i, 4))
        save_png(root / "test" / name / "anomalous" / f"a{i}.png", image)
        if masks:
            save_png(root / "ground_truth" / name / f"a{i}_mask.png", mask)


def save_jpeg(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


TIN_WNIDS = ("n09256479", "n01443537", "n04067472")  # wnids.txt order, not sorted (as in the real file)


def write_tiny_imagenet(root: Path, wnids=TIN_WNIDS, train_per_class: int = 2, val_per_class: int = 2) -> dict:
    """tiny-imagenet-200 layout: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG (+ boxes
    file), val/images/val_<k>.JPEG and val/val_annotations.txt (classes interleaved). Every image is
    flat, 64×64, grey level 20 + 9 k (k counting the side's images as written: JPEG keeps a flat image
    within ±1); val image 1 is a greyscale JPEG (the real set has some). Returns
    {"train": {wnid: [levels]}, "val": [(file name, wnid, level), ...]}."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    train: dict[str, list[int]] = {}
    for wnid in wnids:
        for i in range(train_per_class):
            level = 20 + 9 * sum(len(v) for v in train.values())
            save_jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", np.full((64, 64, 3), level, np.uint8))
            train.setdefault(wnid, []).append(level)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(train_per_class)))
    val = []
    for k in range(len(wnids) * val_per_class):
        wnid, level = wnids[k % len(wnids)], 20 + 9 * k
        shape = (64, 64) if k == 1 else (64, 64, 3)
        save_jpeg(base / "val" / "images" / f"val_{k}.JPEG", np.full(shape, level, np.uint8))
        val.append((f"val_{k}.JPEG", wnid, level))
    (base / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w, _ in val))
    return {"train": train, "val": val}


def save_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (Pillow writes grey I;16 PNGs but not 48-bit RGB ones):
    H×W uint16 -> greyscale (colour type 0), H×W×3 -> RGB (colour type 2), big-endian samples."""
    import struct
    import zlib

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(pixels, dtype=np.uint16)
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def save_high_bit(path: Path, pixels: np.ndarray) -> Path:
    """Grey pixels through Pillow in their own type: uint16 -> I;16 (PNG or TIFF), big-endian
    uint16 -> I;16B TIFF, float32 -> F TIFF, int32 -> I TIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels)).save(path)
    return path
