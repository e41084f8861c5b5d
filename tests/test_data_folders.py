"""Image-folder datasets (MVTec layout, FCDD layout) and the decode cache."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from data import DataError, create_dataset
from data import cache
from data_writers import save_high_bit, save_png, save_png16, write_fcdd, write_mvtec_category


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("ADGRID_CACHE", str(folder))
    return folder


@pytest.fixture
def mvtec_root(tmp_path) -> Path:
    root = tmp_path / "mvtec"
    write_mvtec_category(root, "bottle", size=(24, 20), channels=3)
    write_mvtec_category(root, "grid", size=(16, 16), channels=1, defects={"bent": 2})
    write_mvtec_category(root, "my_part", size=(24, 20), channels=3, defects={"crack": 1})
    (root / "license.txt").write_text("not a category")
    return root


def test_mvtec_categories_counts_and_masks(cache_dir, mvtec_root):
    ds = create_dataset("mvtec", {"root": str(mvtec_root)})
    assert ds.classes() == ["bottle", "grid", "my_part"]
    train = ds.load("train", ["bottle"])
    assert train.images.shape == (4, 24, 20, 3) and train.masks is None
    assert not train.is_anomalous.any() and (train.targets == 0).all()
    np.testing.assert_array_equal(train.images[:, 0, 0, 0], [10, 11, 12, 13])

    test = ds.load("test", ["bottle"])
    assert test.images.shape == (5, 24, 20, 3) and test.masks.shape == (5, 24, 20)
    assert test.meta["defect"].tolist() == ["good", "good", "hole", "scratch", "scratch"]
    assert test.is_anomalous.tolist() == [False, False, True, True, True]
    assert set(np.unique(test.masks).tolist()) == {0, 1}
    assert not test.masks[~test.is_anomalous].any()
    for image, mask in zip(test.images[test.is_anomalous], test.masks[test.is_anomalous]):
        assert mask.sum() > 0 and (image[mask == 1] == 255).all() and (image[mask == 0] != 255).all()
    assert test.meta["path"][2].endswith("bottle/test/hole/000.png")


def test_mvtec_grey_category_and_several_categories(cache_dir, mvtec_root):
    ds = create_dataset("mvtec", {"root": str(mvtec_root)})
    grid = ds.load("test", ["grid"])
    assert grid.images.shape == (4, 16, 16, 1)
    both = ds.load("train", ["bottle", "grid"])
    assert isinstance(both.images, list) and len(both.images) == 8
    assert both.images[0].shape == (24, 20, 3) and both.images[-1].shape == (16, 16, 1)
    assert both.targets.tolist() == [0] * 4 + [1] * 4
    same_size = ds.load("test", ["bottle", "my_part"])
    assert isinstance(same_size.images, np.ndarray) and same_size.images.shape == (8, 24, 20, 3)
    assert same_size.masks.shape == (8, 24, 20)


def test_mvtec_missing_root_explains_layout_and_source(tmp_path):
    ds = create_dataset("mvtec", {"root": str(tmp_path / "absent")})
    with pytest.raises(DataError) as err:
        ds.classes()
    message = str(err.value)
    assert "absent" in message and "train/good" in message and "ground_truth" in message
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in message


def test_mvtec_missing_mask_names_the_file(cache_dir, mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"ground_truth/hole/000_mask\.png"):
        create_dataset("mvtec", {"root": str(mvtec_root)}).load("test", ["bottle"])


def test_mvtec_mask_size_mismatch(cache_dir, mvtec_root):
    save_png(mvtec_root / "bottle" / "ground_truth" / "scratch" / "001_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"001_mask\.png is 10x10 but its image .*scratch/001\.png is 20x24"):
        create_dataset("mvtec", {"root": str(mvtec_root)}).load("test", ["bottle"])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_names_the_file(cache_dir, mvtec_root, damage):
    path = mvtec_root / "bottle" / "train" / "good" / "002.png"
    if damage == "garbage":
        path.write_bytes(b"this is not a png")
    else:
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"train/good/002\.png"):
        create_dataset("mvtec", {"root": str(mvtec_root)}).load("train", ["bottle"])
    assert not list((cache_dir / "decoded").glob(".tmp-*"))  # the failed build left nothing behind


def test_unknown_category_and_empty_folder(cache_dir, mvtec_root):
    ds = create_dataset("mvtec", {"root": str(mvtec_root)})
    with pytest.raises(DataError, match="valid: bottle, grid, my_part"):
        ds.load("train", ["bottel"])
    for png in (mvtec_root / "grid" / "train" / "good").iterdir():
        png.unlink()
    with pytest.raises(DataError, match=r"no training images in .*grid/train/good"):
        ds.load("train", ["grid"])


def test_decode_cache_hit_and_invalidation(cache_dir, mvtec_root):
    images = sorted((mvtec_root / "bottle" / "train" / "good").iterdir())
    first = cache.decode_files(images)
    assert not first.hit and isinstance(first.images, np.memmap)
    again = cache.decode_files(images)
    assert again.hit and again.entry == first.entry
    np.testing.assert_array_equal(again.images, first.images)
    assert not again.images.flags.writeable

    save_png(images[1], np.full((24, 20, 3), 77, dtype=np.uint8))  # same size in bytes, new mtime
    os.utime(images[1], ns=(1, 1))
    changed = cache.decode_files(images)
    assert not changed.hit and changed.entry != first.entry
    assert changed.images[1, 0, 0, 0] == 77 and changed.images[0, 0, 0, 0] == 10
    assert not (cache_dir / "decoded" / first.entry).exists()  # the stale entry was pruned

    before = images[2].stat()
    save_png(images[2], np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    os.utime(images[2], ns=(before.st_atime_ns, before.st_mtime_ns))  # only the size tells
    assert images[2].stat().st_size != before.st_size
    assert not cache.decode_files(images).hit


def test_decode_cache_race_keeps_the_first_entry(cache_dir, mvtec_root):
    images = sorted((mvtec_root / "bottle" / "train" / "good").iterdir())
    first = cache.decode_files(images)
    final = cache.decoded_dir() / first.entry
    cache._build_entry(final, images, None)  # a second worker finishing after the first
    assert sorted(p.name for p in cache.decoded_dir().iterdir()) == [first.entry]
    assert cache.decode_files(images).hit


def test_decode_cache_ragged_entry_round_trip(cache_dir, tmp_path):
    paths = [save_png(tmp_path / f"{i}.png", np.full((5 + i, 7, 3), i, np.uint8)) for i in range(3)]
    masks = [None, save_png(tmp_path / "m1.png", np.full((6, 7), 255, np.uint8)), None]
    for expect_hit in (False, True):
        decoded = cache.decode_files(paths, masks)
        assert decoded.hit is expect_hit
        assert [im.shape for im in decoded.images] == [(5, 7, 3), (6, 7, 3), (7, 7, 3)]
        assert [int(m.sum()) for m in decoded.masks] == [0, 42, 0]
        assert [int(im[0, 0, 0]) for im in decoded.images] == [0, 1, 2]


def test_fcdd_folder_layout(cache_dir, tmp_path):
    root = tmp_path / "custom"
    write_fcdd(root, "cans", sizes=[(12, 10), (14, 9)], masks=True)
    write_fcdd(root, "nuts", sizes=[(8, 8)], masks=False, train_subfolder=True)
    ds = create_dataset("folder", {"root": str(root)})
    assert ds.classes() == ["cans", "nuts"]
    train = ds.load("train", ["cans"])
    assert isinstance(train.images, list) and [im.shape for im in train.images] == [(12, 10, 3), (14, 9, 3)]
    test = ds.load("test", ["cans"])
    assert test.is_anomalous.tolist() == [False, False, True, True]
    assert test.masks.shape == (4, 12, 10) and test.masks[:2].sum() == 0
    for image, mask in zip(test.images[2:], test.masks[2:]):
        assert (image[mask == 1] == 255).all() and mask.sum() > 0
    nuts = ds.load("test", ["nuts"])
    assert nuts.masks is None and nuts.is_anomalous.sum() == 2
    assert len(ds.load("train", ["nuts"]).targets) == 1


def test_fcdd_errors(cache_dir, tmp_path):
    root = tmp_path / "custom"
    with pytest.raises(DataError, match="does not exist"):
        create_dataset("folder", {"root": str(root)}).classes()
    write_fcdd(root, "cans", sizes=[(12, 10)], masks=True)
    (root / "ground_truth" / "cans" / "a1_mask.png").unlink()
    with pytest.raises(DataError, match=r"missing mask .*a1_mask\.png for anomalous image .*a1\.png"):
        create_dataset("folder", {"root": str(root)}).load("test", ["cans"])
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images in .*train/empty"):
        create_dataset("folder", {"root": str(root)}).load("train", ["empty"])


# ---------------------------------------------------------------------------------------------
# high bit depth: scaled by the type's range, never clipped; unsupported types refused

def _encode(level8: np.ndarray, fmt: str) -> tuple[np.ndarray, str]:
    """8-bit levels as a high-bit-depth file's values (and suffix) that must decode back to them:
    16-bit values carry a low byte that the decoder must drop, floats are level / 255."""
    if fmt == "float_tif":
        return (level8 / 255.0).astype(np.float32), ".tif"
    values = level8.astype(np.uint16) * 256 + 0xA7
    if fmt == "uint16_be_tif":
        return values.astype(">u2"), ".tif"
    return values, ".png" if fmt == "uint16_png" else ".tif"


@pytest.mark.parametrize("fmt", ["uint16_png", "uint16_tif", "uint16_be_tif", "float_tif"])
def test_high_bit_depth_grey_images_and_masks_are_scaled(cache_dir, tmp_path, fmt):
    from PIL import Image

    root = tmp_path / "deep"
    levels = {f"train/parts/t{i}": np.add.outer(np.arange(6), np.arange(5)).astype(np.uint8) * 9 + 40 * i
              for i in range(3)}
    levels["test/parts/normal/n0"] = np.full((6, 5), 200, np.uint8)
    levels["test/parts/anomalous/a0"] = np.full((6, 5), 3, np.uint8)
    for name, level in levels.items():
        values, suffix = _encode(level, fmt)
        save_high_bit(root / f"{name}{suffix}", values)
    mask = np.zeros((6, 5), np.float32 if fmt == "float_tif" else np.uint16)
    mask[1:3, 2:4] = 0.25 if fmt == "float_tif" else 1  # both decode to 0 through convert("L")
    save_high_bit(root / "ground_truth" / "parts" / f"a0_mask{suffix}", mask)
    expected_mode = {"uint16_png": "I;16", "uint16_tif": "I;16", "uint16_be_tif": "I;16B", "float_tif": "F"}[fmt]
    assert Image.open(root / f"train/parts/t0{suffix}").mode == expected_mode

    ds = create_dataset("folder", {"root": str(root)})
    train = ds.load("train", ["parts"])
    assert train.images.shape == (3, 6, 5, 1)
    for i in range(3):
        np.testing.assert_array_equal(train.images[i, ..., 0], levels[f"train/parts/t{i}"])
    test = ds.load("test", ["parts"])
    assert test.images[:, 0, 0, 0].tolist() == [200, 3]
    np.testing.assert_array_equal(test.masks[1], (mask != 0).astype(np.uint8))
    assert test.masks[0].sum() == 0


def test_high_bit_depth_grey_among_colour_and_48_bit_rgb(cache_dir, tmp_path):
    train = tmp_path / "mix" / "train" / "parts"
    save_png(train / "a8.png", np.full((4, 4, 3), 17, np.uint8))
    save_high_bit(train / "b16.png", np.full((4, 4), 0x9A01, np.uint16))  # grey 16-bit among colour
    rgb48 = np.empty((4, 4, 3), np.uint16)
    rgb48[...] = [0x12FF, 0xFF00, 0x0080]
    save_png16(train / "c48.png", rgb48)
    decoded = cache.decode_files(sorted(train.iterdir()))
    assert decoded.images.shape == (3, 4, 4, 3)
    assert decoded.images[0, 0, 0].tolist() == [17, 17, 17]
    assert decoded.images[1, 0, 0].tolist() == [0x9A] * 3
    assert decoded.images[2, 0, 0].tolist() == [0x12, 0xFF, 0x00]  # Pillow's own 16 -> 8 (high byte)


@pytest.mark.parametrize("values,message", [
    (np.linspace(0, 1000, 30, dtype=np.float32).reshape(6, 5), r"values in \[0, 1000\]"),
    (np.full((6, 5), np.nan, np.float32), r"values in \[nan, nan\]"),
    (np.full((6, 5), 70000, np.int32), r"I;32S integer images .* not supported"),
])
def test_unsupported_high_bit_depth_images_are_refused(cache_dir, tmp_path, values, message):
    root = tmp_path / "bad"
    write_fcdd(root, "parts", sizes=[(6, 5)], masks=False)
    save_high_bit(root / "train" / "parts" / "deep.tif", values)
    with pytest.raises(DataError, match=r"cannot decode image .*train/parts/deep\.tif: .*" + message):
        create_dataset("folder", {"root": str(root)}).load("train", ["parts"])


def test_cell_on_16_bit_images_detects_the_defects(cache_dir, tmp_path):
    """A real cell on 16-bit PNGs: clipped to 255 every image was one flat grey and AUROC 0.5."""
    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]

    def texture(defect: bool) -> np.ndarray:
        a, b = rng.uniform(0, 2 * np.pi, 2)
        level = 30000 + 8000 * np.sin(xx / 3 + a) * np.cos(yy / 4 + b) + rng.normal(0, 300, (32, 32))
        if defect:
            y, x = rng.integers(4, 20, 2)
            level[y:y + 8, x:x + 8] = 65000
        return level.clip(0, 65535).astype(np.uint16)

    root = tmp_path / "deep"
    for i in range(12):
        save_high_bit(root / "train" / "parts" / f"t{i}.png", texture(False))
    for i in range(8):
        save_high_bit(root / "test" / "parts" / "normal" / f"n{i}.png", texture(False))
        save_high_bit(root / "test" / "parts" / "anomalous" / f"a{i}.png", texture(True))
    cell = Cell(method="patchcore", params=dict(backbone="resnet18", pretrained=False, image_size=32, crop=None),
                dataset="folder", dataset_params={"root": str(root)}, protocol="one_class",
                normal_class="parts", seed=0)
    (row,) = run_cell(cell)
    assert row["status"] == "ok", row.get("error")
    assert row["image_auroc"] >= 0.9
