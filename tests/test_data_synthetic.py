"""The procedural MVTec-style set: determinism, layout, masks, and reading back through mvtec."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from data import create_dataset
from data.datasets.synthetic import CATEGORIES, ensure_generated, image_rng, params_hash, to_uint8
from data.protocols import make_splits

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 4, "image_size": 64}


def generated_files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_identical_bytes(tmp_path, monkeypatch):
    params = create_dataset("synthetic", {**SMALL, "categories": ["weave", "chip"]}).params
    roots = []
    for name in ("a", "b"):
        monkeypatch.setenv("ADGRID_CACHE", str(tmp_path / name))
        roots.append(ensure_generated(params, params.categories))
    first, second = (generated_files(r) for r in roots)
    assert first == second and len(first) == 2 * (3 + 2 + 4 + 4)
    assert "weave/ground_truth/scratch/000_mask.png" in first and "chip/train/good/002.png" in first
    other = create_dataset("synthetic", {**SMALL, "categories": ["weave", "chip"], "seed": 1}).params
    assert params_hash(other) != params_hash(params)
    monkeypatch.setenv("ADGRID_CACHE", str(tmp_path / "c"))
    assert generated_files(ensure_generated(other, other.categories)) != first


def test_reads_back_through_the_mvtec_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("ADGRID_CACHE", str(tmp_path))
    synthetic = create_dataset("synthetic", SMALL)
    assert synthetic.classes() == list(CATEGORIES)
    test = synthetic.load("test", ["disc"])
    root = ensure_generated(synthetic.params, ["disc"])
    as_mvtec = create_dataset("mvtec", {"root": str(root)}).load("test", ["disc"])
    np.testing.assert_array_equal(test.images, as_mvtec.images)
    np.testing.assert_array_equal(test.masks, as_mvtec.masks)
    assert test.images.shape == (6, 64, 64, 3) and test.is_anomalous.sum() == 4
    assert set(test.meta["defect"]) == {"good", "bite", "spot", "crack", "missing_print"}
    assert all(m.any() for m in test.masks[test.is_anomalous]) and not test.masks[~test.is_anomalous].any()
    grey = synthetic.load("train", ["granite"])
    assert grey.images.shape == (3, 64, 64, 1)


def test_defects_change_exactly_the_masked_pixels(tmp_path, monkeypatch):
    """Regenerating a defect image's normal canvas from the same random stream: every pixel that
    differs lies in the mask, and most mask pixels differ."""
    monkeypatch.setenv("ADGRID_CACHE", str(tmp_path))
    params = {**SMALL, "n_test_defect": 6}
    for category in ("weave", "granite", "disc", "chip"):
        test = create_dataset("synthetic", {**params, "categories": [category]}).load("test")
        normal, defects = CATEGORIES[category]
        names = list(defects)
        for index in np.flatnonzero(test.is_anomalous):
            defect, stem = test.meta["defect"][index], int(Path(test.meta["path"][index]).stem)
            stream = image_rng(0, category, "defect", stem * len(names) + names.index(defect))
            before = to_uint8(normal(stream, 64)[0]).reshape(test.images[index].shape)
            changed = (before != test.images[index]).any(axis=-1)
            mask = test.masks[index].astype(bool)
            assert not (changed & ~mask).any(), (category, defect)
            assert changed[mask].mean() > 0.5, (category, defect)


def test_splits_and_params_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("ADGRID_CACHE", str(tmp_path))
    params = {**SMALL, "categories": ["weave", "granite"]}
    train, tests = make_splits("synthetic", params, "unified", "all")
    assert len(train) == 6 and [name for name, _ in tests] == ["weave", "granite"]
    assert all(set(t.labels.tolist()) == {0, 1} for _, t in tests)
    assert tests[1][1].masks.shape == (6, 64, 64)
    with pytest.raises(ValidationError):
        create_dataset("synthetic", {"categories": ["plaid"]})
    with pytest.raises(ValidationError):
        create_dataset("synthetic", {"image_size": 8})


def test_defect_scale_grows_the_same_defects(tmp_path, monkeypatch):
    """defect_scale multiplies each drawn extent after the same random draws: scale 1 is the default
    set byte for byte, scale 2 draws each defect at the same place with a larger mask (a missing
    print keeps its size)."""
    monkeypatch.setenv("ADGRID_CACHE", str(tmp_path))
    params = {**SMALL, "n_test_defect": 8, "categories": ["disc", "weave"]}
    masks = {}
    for scale in (None, 1.0, 2.0):
        extra = {} if scale is None else {"defect_scale": scale}
        for category in ("disc", "weave"):
            test = create_dataset("synthetic", {**params, **extra, "categories": [category]}).load("test")
            masks[scale, category] = (test.masks.astype(bool), test.images, list(test.meta["defect"]))
    for category in ("disc", "weave"):
        base, one, two = masks[None, category], masks[1.0, category], masks[2.0, category]
        np.testing.assert_array_equal(base[1], one[1])
        assert base[2] == two[2]
        for m1, m2, defect in zip(base[0], two[0], base[2]):
            if defect == "good":
                assert not m1.any() and not m2.any()
            elif defect == "missing_print":
                np.testing.assert_array_equal(m1, m2)
            else:
                assert m2.sum() > 1.5 * m1.sum() and (m1 & m2).any(), (category, defect)
    with pytest.raises(ValidationError):
        create_dataset("synthetic", {"defect_scale": 0})
