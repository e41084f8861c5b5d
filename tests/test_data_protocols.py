"""Protocols over small datasets written in their real formats: classes, splits, labels, keys."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data import DataError
from data.protocols import PROTOCOLS, class_label, convert_images, make_splits, resolve_classes
from data_writers import CIFAR10_NAMES, save_png, write_cifar10, write_mnist, write_mvtec_category, write_svhn


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ADGRID_CACHE", str(folder))
    return folder


@pytest.fixture
def cifar(tmp_path):
    write_cifar10(tmp_path / "cifar10")
    return {"root": str(tmp_path / "cifar10")}


@pytest.fixture
def mvtec(tmp_path, cache_dir):
    root = tmp_path / "mvtec"
    write_mvtec_category(root, "bottle", size=(24, 20), channels=3)
    write_mvtec_category(root, "grid", size=(16, 16), channels=1, defects={"bent": 2})
    return {"root": str(root)}


def test_protocol_table():
    assert set(PROTOCOLS) == {"one_class", "unified", "ood", "osr"}
    assert all(isinstance(text, str) and text for text in PROTOCOLS.values())


def test_resolve_classes_forms(cifar):
    assert resolve_classes("cifar10", cifar, "all") == CIFAR10_NAMES
    assert resolve_classes("cifar10", cifar, [0, "cat", [4, 3, "airplane"], 0]) == [
        "airplane", "cat", ("airplane", "cat", "deer")]
    assert resolve_classes("cifar10", cifar, [[5, 6, 7, 8, 9]]) == [("dog", "frog", "horse", "ship", "truck")]
    assert class_label(("airplane", "cat")) == "airplane+cat" and class_label("cat") == "cat"
    assert class_label("all") == "all"


@pytest.mark.parametrize("spec", [["kat"], [10], [[1, "nope"]], [[]]])
def test_resolve_classes_unknown_lists_valid_names(cifar, spec):
    with pytest.raises(DataError) as err:
        resolve_classes("cifar10", cifar, spec)
    if spec != [[]]:
        assert "airplane, automobile, bird" in str(err.value)


def test_resolve_classes_on_folders_decodes_nothing(mvtec, cache_dir):
    assert resolve_classes("mvtec", mvtec, "all") == ["bottle", "grid"]
    assert resolve_classes("mvtec", mvtec, [1, ["grid", "bottle"]]) == ["grid", ("bottle", "grid")]
    assert not (cache_dir / "decoded").exists()


def test_one_class_classification(cifar):
    train, tests = make_splits("cifar10", cifar, "one_class", "cat")
    (name, test), = tests
    assert name is None
    assert len(train) == 3 and (train.labels == 0).all() and (train.targets == 3).all()
    assert train.images.shape == (3, 32, 32, 3) and (train.images[:, 0, 0, 0] == 3).all()
    assert train.class_names == CIFAR10_NAMES and train.masks is None
    assert len(test) == 20 and test.labels.sum() == 18
    np.testing.assert_array_equal(test.labels, (test.targets != 3).astype(int))
    assert (test.images[:, 0, 0, 0] == test.targets).all()


def test_one_class_with_a_class_set(cifar):
    normal = resolve_classes("cifar10", cifar, [[0, 1, 2, 3, 4]])[0]
    train, [(_, test)] = make_splits("cifar10", cifar, "one_class", normal)
    assert len(train) == 15 and set(train.targets.tolist()) == {0, 1, 2, 3, 4}
    assert train.meta["normal_class"] == "airplane+automobile+bird+cat+deer"
    np.testing.assert_array_equal(test.labels, (test.targets >= 5).astype(int))


def test_one_class_defect_dataset(mvtec):
    train, [(_, test)] = make_splits("mvtec", mvtec, "one_class", "bottle")
    assert len(train) == 4 and (train.labels == 0).all() and train.masks is None
    assert test.labels.tolist() == [0, 0, 1, 1, 1] and (test.targets == 0).all()
    assert test.masks.shape == (5, 24, 20)
    assert [bool(m.any()) for m in test.masks] == [False, False, True, True, True]
    assert test.meta["defect"].tolist() == ["good", "good", "hole", "scratch", "scratch"]
    assert test.class_names == ["bottle", "grid"]


def test_unified_trains_on_every_category(mvtec):
    train, tests = make_splits("mvtec", mvtec, "unified", "all")
    assert len(train) == 8 and (train.labels == 0).all() and isinstance(train.images, list)
    assert train.targets.tolist() == [0] * 4 + [1] * 4
    assert [name for name, _ in tests] == ["bottle", "grid"]
    grid = tests[1][1]
    assert grid.labels.tolist() == [1, 1, 0, 0] and (grid.targets == 1).all()  # "bent" < "good"
    assert grid.images.shape == (4, 16, 16, 1) and grid.masks.shape == (4, 16, 16)
    assert tests[0][1].key != grid.key and "test:grid" in grid.key


def test_unified_needs_a_defect_dataset(cifar):
    with pytest.raises(DataError, match="unified protocol needs"):
        make_splits("cifar10", cifar, "unified", "all")


def test_ood_converts_ood_images_to_the_id_format(tmp_path, cifar):
    write_svhn(tmp_path / "svhn")
    write_mnist(tmp_path / "mnist")
    ood_params = {"svhn": {"root": str(tmp_path / "svhn")}, "mnist": {"root": str(tmp_path / "mnist")}}
    train, tests = make_splits("cifar10", cifar, "ood", "all", ood=["svhn", "mnist"], ood_params=ood_params)
    assert len(train) == 30 and (train.labels == 0).all() and train.class_names == CIFAR10_NAMES
    assert [name for name, _ in tests] == ["svhn", "mnist"]
    for name, test in tests:
        n_ood = 20
        assert test.images.shape == (20 + n_ood, 32, 32, 3) and test.images.dtype == np.uint8
        assert test.labels.tolist() == [0] * 20 + [1] * n_ood
        assert (test.targets[20:] == -1).all() and (test.targets[:20] >= 0).all()
        assert test.meta["ood_set"] == name and f"ood={name}" in test.key
    mnist_part = tests[1][1].images[20:]
    assert (mnist_part[..., 0] == mnist_part[..., 1]).all()  # grey repeated to three channels
    assert tests[0][1].key != tests[1][1].key


def test_ood_with_a_class_set_reindexes_targets(tmp_path, cifar):
    write_mnist(tmp_path / "mnist")
    normal = ("cat", "dog")
    train, [(_, test)] = make_splits("cifar10", cifar, "ood", normal, ood=["mnist"],
                                     ood_params={"mnist": {"root": str(tmp_path / "mnist")}})
    assert train.class_names == ["cat", "dog"] and sorted(set(train.targets.tolist())) == [0, 1]
    np.testing.assert_array_equal(np.where(train.targets == 0, 3, 5), train.images[:, 0, 0, 0])
    assert len(test) == 4 + 20 and sorted(test.targets[:4].tolist()) == [0, 0, 1, 1]
    np.testing.assert_array_equal(np.where(test.targets[:4] == 0, 3, 5), test.images[:4, 0, 0, 0])


def test_ood_mnist_in_distribution_gets_grey_28px_ood(tmp_path, cifar):
    write_mnist(tmp_path / "mnist")
    _, [(_, test)] = make_splits("mnist", {"root": str(tmp_path / "mnist")}, "ood", "all", ood=["cifar10"],
                                 ood_params={"cifar10": cifar})
    assert test.images.shape == (20 + 20, 28, 28, 1)


def test_ood_bad_inputs(cifar):
    with pytest.raises(DataError, match="at least one OOD dataset"):
        make_splits("cifar10", cifar, "ood", "all")
    with pytest.raises(DataError, match="not in the OOD datasets"):
        make_splits("cifar10", cifar, "ood", "all", ood=["svhn"], ood_params={"mnist": {}})


def test_osr_known_classes(cifar):
    train, [(name, test)] = make_splits("cifar10", cifar, "osr", ("airplane", "cat", "ship"))
    assert name is None and train.class_names == ["airplane", "cat", "ship"]
    assert sorted(set(train.targets.tolist())) == [0, 1, 2] and len(train) == 9
    known = np.isin(test.images[:, 0, 0, 0], [0, 3, 8])
    np.testing.assert_array_equal(test.labels, (~known).astype(int))
    assert (test.targets[~known] == -1).all() and set(test.targets[known].tolist()) == {0, 1, 2}
    with pytest.raises(DataError, match="smaller than all classes"):
        make_splits("cifar10", cifar, "osr", "all")


def test_bad_inputs(cifar, mvtec, tmp_path):
    with pytest.raises(DataError, match="unknown protocol"):
        make_splits("cifar10", cifar, "two_class", "cat")
    with pytest.raises(DataError, match="unknown class 'kat'"):
        make_splits("cifar10", cifar, "one_class", "kat")
    write_mvtec_category(tmp_path / "mvtec", "flawless", defects={})
    with pytest.raises(DataError, match="only normal images"):
        make_splits("mvtec", mvtec, "one_class", "flawless")
    with pytest.raises(DataError, match="only normal images"):
        make_splits("cifar10", cifar, "one_class", tuple(CIFAR10_NAMES))
    write_mvtec_category(tmp_path / "mvtec", "broken", n_good=0)
    with pytest.raises(DataError, match="only anomalous images"):
        make_splits("mvtec", mvtec, "one_class", "broken")


def test_keys_identify_content_and_ignore_seed_and_download(cifar, mvtec):
    train, [(_, test)] = make_splits("cifar10", cifar, "one_class", "cat", seed=0)
    train_again, [(_, test_again)] = make_splits("cifar10", {**cifar, "download": False}, "one_class", "cat", seed=7)
    assert train.key == train_again.key and test.key == test_again.key
    np.testing.assert_array_equal(test.images, test_again.images)
    keys = {train.key, test.key,
            make_splits("cifar10", cifar, "one_class", "dog")[0].key,
            make_splits("cifar10", cifar, "osr", ("cat", "dog"))[0].key,
            make_splits("cifar10", {**cifar, "root": cifar["root"] + "/"}, "one_class", "cat")[0].key}
    assert len(keys) == 5
    assert '"root":' in train.key and "|one_class|cat|train" in train.key
    # the test images of one_class are the same for every normal class: images_key says so
    other_test = make_splits("cifar10", cifar, "one_class", "dog")[1][0][1]
    assert other_test.meta["images_key"] == test.meta["images_key"] and other_test.key != test.key


def test_folder_keys_change_when_files_change(mvtec):
    key = make_splits("mvtec", mvtec, "one_class", "bottle")[0].key
    assert "files=" in key
    save_png(Path(mvtec["root"]) / "bottle" / "train" / "good" / "000.png", np.zeros((24, 20, 3), np.uint8))
    assert make_splits("mvtec", mvtec, "one_class", "bottle")[0].key != key


def test_convert_images_resizes_lists_and_channels():
    images = [np.full((10, 12, 3), 90, np.uint8), np.full((6, 6, 1), 30, np.uint8)]
    out = convert_images(images, 8, 8, 1)
    assert out.shape == (2, 8, 8, 1) and out[0].max() == 90 and out[1].min() == 30


def test_ood_on_a_defect_dataset_keeps_only_normal_test_images(tmp_path, mvtec):
    write_mnist(tmp_path / "mnist")
    train, [(_, test)] = make_splits("mvtec", mvtec, "ood", "bottle", ood=["mnist"],
                                     ood_params={"mnist": {"root": str(tmp_path / "mnist")}})
    assert len(train) == 4 and train.class_names == ["bottle"] and (train.targets == 0).all()
    assert test.images.shape == (2 + 20, 24, 20, 3) and test.labels.tolist() == [0] * 2 + [1] * 20
    assert "subset=normal" in test.key and test.masks is None


def test_ood_images_resize_the_short_side_and_centre_crop_as_openood():
    """OpenOOD's test preprocessor: Resize(32) of the short side, CenterCrop(32)
    (openood/evaluation_api/preprocessor.py); ``squash`` keeps the old both-sides resize."""
    from data.protocols import short_side_geometry

    assert short_side_geometry(375, 500, 32, 32) == (32, 42, 0, 5)      # torchvision: int(32·500/375) = 42
    assert short_side_geometry(500, 375, 32, 32) == (42, 32, 5, 0)
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)       # red outer quarters, blue middle: a centre crop sees only blue
    wide[:, 60:] = (255, 0, 0)
    wide[:, 20:60] = (0, 0, 255)
    crop = convert_images(wide[None], 20, 20, 3)
    squash = convert_images(wide[None], 20, 20, 3, resize="squash")
    assert crop.shape == squash.shape == (1, 20, 20, 3)
    assert crop[0, :, 1:-1, 0].max() <= 2 and crop[0, :, 1:-1, 2].min() >= 253   # edge columns: filter taps
    assert squash[0, :, :4, 0].min() >= 250                              # squashed: the red stays
    import torchvision.transforms as T
    from PIL import Image

    ref = np.asarray(T.CenterCrop(20)(T.Resize(20)(Image.fromarray(wide))))
    assert np.abs(ref.astype(int) - crop[0].astype(int)).max() <= 2


def test_ood_image_lists_and_the_ood_lists_setting(tmp_path, cifar, cache_dir):
    """An OpenOOD benchmark_imglist file replaces an OOD set's test side; a cell records
    ood_lists "filtered" only when every OOD set used a list."""
    from orchestrator.cell import ood_setting

    write_svhn(tmp_path / "svhn")
    write_mnist(tmp_path / "mnist")
    images = tmp_path / "images_classic"
    rng = np.random.default_rng(0)
    for i in range(3):
        save_png(images / "svhn" / "test" / f"{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    listing = tmp_path / "test_svhn.txt"
    listing.write_text("".join(f"svhn/test/{i}.png -1\n" for i in range(3)))
    listed = {"root": str(tmp_path / "svhn"), "image_list": str(listing), "images_root": str(images)}
    _, tests = make_splits("cifar10", cifar, "ood", "all", ood=["svhn", "mnist"],
                           ood_params={"svhn": listed, "mnist": {"root": str(tmp_path / "mnist")}})
    svhn, mnist = tests[0][1], tests[1][1]
    assert len(svhn) == 20 + 3 and svhn.meta["ood_list"] == "filtered" and mnist.meta["ood_list"] == "full"
    assert svhn.meta["ood_resize"] == "short_side_crop"
    assert ood_setting(tests)["ood_lists"] == "full"                     # mnist was not filtered
    assert ood_setting(tests[:1])["ood_lists"] == "filtered"
    _, ((_, only),) = make_splits("cifar10", cifar, "ood", "all", ood=["svhn"],
                             ood_params={"svhn": {"root": str(tmp_path / "svhn")}})
    assert only.key != svhn.key and len(only) == 40
    with pytest.raises(DataError, match="images_root"):
        make_splits("cifar10", cifar, "ood", "all", ood=["svhn"],
                    ood_params={"svhn": {"root": str(tmp_path / "svhn"), "image_list": str(listing)}})
    with pytest.raises(DataError, match="resize"):
        make_splits("cifar10", cifar, "ood", "all", ood=["svhn"],
                    ood_params={"svhn": {"root": str(tmp_path / "svhn"), "resize": "stretch"}})
