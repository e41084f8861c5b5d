"""What a split tells a method (typed fields, not keys): dataset, normal classes, geometry, the
statistics and recipe family the dataset declares; a plugin dataset's declared statistics reach the
built-in methods' inputs; outlier-exposure images come from the grid's dataset entry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import methods
from data.base import ClassStatistics, Dataset, DatasetParams, RawData, Statistics, register_dataset
from data.protocols import make_splits
from methods.deep_one_class import MnistLeNet
from methods.base import RunContext, create

PLUGIN = "plugin_declared_stats"
LO, HI = -1.5, 7.0            # the plugin's GCN-l1 min / max for its class "blob"
MEAN, STD = (0.3,), (0.2,)    # its dataset-wide mean / std


@register_dataset(PLUGIN)
class DeclaredStats(Dataset):
    """A user's dataset, as a plugin would register it: 28×28 grey blobs and rings, declaring its
    own preprocessing statistics and recipe family."""

    Params = DatasetParams
    statistics = Statistics(mean=MEAN, std=STD, source="the plugin's own mean / std",
                            per_class={"blob": ClassStatistics(gcn_min=(LO,), gcn_max=(HI,))},
                            class_source="plugin constants", side=28, channels=1)
    recipe_family = "mnist"

    def classes(self) -> list[str]:
        return ["blob", "ring"]

    def load(self, side, classes=None) -> RawData:
        rng = np.random.default_rng(0 if side == "train" else 1)
        yy, xx = np.mgrid[:28, :28]
        images, targets = [], []
        for i in range(60):
            t = i % 2
            cy, cx, r = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(4, 8)
            d = np.hypot(yy - cy, xx - cx)
            shape = d < r if t == 0 else np.abs(d - r) < 1.5
            images.append((shape * rng.uniform(150, 255) + rng.uniform(0, 40, (28, 28))).clip(0, 255))
            targets.append(t)
        images, targets = np.stack(images).astype(np.uint8)[..., None], np.asarray(targets, np.int64)
        if classes is not None:
            keep = np.isin(targets, [self.classes().index(c) for c in classes])
            images, targets = images[keep], targets[keep]
        return RawData(images=images, targets=targets, class_names=self.classes())


def gcn_minmax_by_hand(images: np.ndarray, lo: float, hi: float) -> torch.Tensor:
    """GCN with the l1 scale per image, then (x - lo) / (hi - lo), written out in numpy."""
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    x = x - x.mean(axis=(1, 2, 3), keepdims=True)
    x = x / np.abs(x).mean(axis=(1, 2, 3), keepdims=True)
    return torch.from_numpy((x - lo) / (hi - lo)).float()


def test_make_splits_fills_the_typed_fields_from_the_declarations():
    train, [(_, test)] = make_splits(PLUGIN, {}, "one_class", "blob")
    for split in (train, test):
        assert split.dataset == PLUGIN and split.normal_classes == ("blob",) and split.normal_class == "blob"
        assert (split.channels, split.size) == (1, (28, 28))
        assert split.statistics is DeclaredStats.statistics and split.recipe_family == "mnist"
    assert train.outlier_exposure is None
    sets, _ = make_splits("digits", {}, "one_class", ("0", "1"))
    assert sets.normal_classes == ("0", "1") and sets.normal_class is None
    assert (sets.dataset, sets.recipe_family, sets.statistics.per_class) == ("digits", "mnist", {})


def test_dsvdd_feeds_its_net_the_plugin_declared_gcn_minmax_inputs():
    """Every batch the LeNet sees (DCAE pre-training and Deep SVDD training) and every test input is
    GCN-l1 then min-max with the plugin's constants, not ones computed from the images."""
    train, [(_, test)] = make_splits(PLUGIN, {}, "one_class", "blob")
    seen: list[torch.Tensor] = []

    def capture(module, args):
        if isinstance(module, MnistLeNet):
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(capture)
    try:
        m = create("dsvdd", dict(ae_epochs=1, ae_batch_size=16, epochs=1, batch_size=16), RunContext(seed=0))
        m.fit(train)
    finally:
        handle.remove()
    expected = gcn_minmax_by_hand(np.asarray(train.images), LO, HI).flatten(1)
    fed = torch.cat(seen).flatten(1)
    assert len(fed) >= 2 * len(expected)   # pre-training, centre and training passes
    nearest = torch.cdist(fed.double(), expected.double()).min(dim=1).values
    assert float(nearest.max()) < 1e-4
    torch.testing.assert_close(m.inputs(test.images), gcn_minmax_by_hand(np.asarray(test.images), LO, HI),
                               rtol=1e-5, atol=1e-5)
    norm = m.resolved_params()["preprocessing"]["normalisation"]
    assert (norm["min"], norm["max"], norm["source"]) == ([LO], [HI], f"plugin constants {PLUGIN}/blob")
    # a class the plugin declares nothing for: computed from its images
    other, _ = make_splits(PLUGIN, {}, "one_class", "ring")
    m2 = create("dcae", dict(ae_epochs=1, ae_batch_size=16), RunContext(seed=0))
    m2.fit(other)
    assert m2.resolved_params()["preprocessing"]["normalisation"]["source"].startswith("computed")


def test_the_classifier_normalises_with_the_declared_mean_and_std():
    from methods.classifier import ClassifierParams, make_inputs

    train, _ = make_splits(PLUGIN, {}, "osr", ("blob",))
    inputs = make_inputs(ClassifierParams(image_size=28), train)
    x = inputs.normalize(inputs.prepare(train.images))
    want = (torch.from_numpy(np.repeat(train.images, 3, axis=-1)).permute(0, 3, 1, 2).float() / 255 - 0.3) / 0.2
    torch.testing.assert_close(x, want)
    assert inputs.source == "auto: the plugin's own mean / std"
    digits, _ = make_splits("digits", {}, "osr", ("0", "1"))
    assert make_inputs(ClassifierParams(), digits).mean == (0.5, 0.5, 0.5)   # declares none: OpenOOD's fallback


def test_recipe_family_picks_the_presets():
    from methods.kdad import auto_preset
    from methods.uniad import dataset_setting

    train, _ = make_splits(PLUGIN, {}, "one_class", "blob")
    assert auto_preset(train) == "mnist" and dataset_setting(train) == "mvtec"
    colour = type(train)(images=np.zeros((2, 100, 100, 3), np.uint8), labels=np.zeros(2, np.int64),
                         targets=np.zeros(2, np.int64), class_names=["a"], key="cifar10|{}|x", recipe_family="cifar10")
    assert auto_preset(colour) == "cifar10" and dataset_setting(colour) == "cifar10"


# ------------------------------------------------------------------------------------------
# outlier exposure from the data side

FAST_FCDD = dict(net="cnn28", epochs=1, batch_size=32, anomaly_source="oe", augment=False)


def test_fcdd_takes_outlier_exposure_from_the_dataset_entry():
    train, _ = make_splits(PLUGIN, {}, "one_class", "blob", outlier_exposure={"name": "digits", "image_size": 28})
    assert (train.outlier_exposure.name, dict(train.outlier_exposure.params)) == ("digits", {"image_size": 28})
    m = create("fcdd", FAST_FCDD, RunContext(seed=0))
    m.fit(train)
    rp = m.resolved_params()
    assert (rp["oe_dataset"], rp["oe_origin"], rp["oe_pool_size"]) == ("digits", "dataset digits (train side)", 1078)
    with pytest.raises(ValueError, match="disagree"):
        create("fcdd", dict(FAST_FCDD, oe_dataset="cifar100"), RunContext()).fit(train)
    # without an entry the params name the set, as before (the data side still reads it)
    plain, _ = make_splits(PLUGIN, {}, "one_class", "blob")
    m = create("fcdd", dict(FAST_FCDD, oe_dataset="digits", oe_dataset_params={"image_size": 16}), RunContext())
    m.fit(plain)
    assert m.resolved_params()["oe_origin"] == "dataset digits (train side)"


def test_outlier_exposure_enters_the_cell_identity_only_when_set(tmp_path):
    from orchestrator.config import ConfigError, GridConfig, check_names
    from orchestrator.grid import expand

    def grid(extra: dict) -> GridConfig:
        return GridConfig.model_validate({
            "name": "t", "datasets": [{"name": "digits", "classes": [0], **extra}],
            "methods": [{"name": "fcdd", "params": {"net": "cnn28", "anomaly_source": "oe"}}]})

    plain = expand(grid({})).cells[0]
    named = expand(grid({"outlier_exposure": {"name": "digits", "image_size": 28, "root": "/x"}})).cells[0]
    moved = expand(grid({"outlier_exposure": {"name": "digits", "image_size": 28, "root": "/y"}})).cells[0]
    assert "outlier_exposure" not in plain.identity and plain.outlier_exposure == {}
    assert named.identity["outlier_exposure"] == {"name": "digits", "image_size": 28}  # location params left out
    assert named.cell_id != plain.cell_id and named.cell_id == moved.cell_id
    assert type(named).from_dict(named.to_dict()) == named
    with pytest.raises(ConfigError, match=r"outlier_exposure.name: unknown dataset 'cifar1000'"):
        check_names(grid({"outlier_exposure": {"name": "cifar1000"}}))
    with pytest.raises(ConfigError, match=r"outlier_exposure \(digits\)"):
        check_names(grid({"outlier_exposure": {"name": "digits", "image_size": 2}}))


def test_run_cell_hands_the_entry_outlier_set_to_fcdd():
    import json

    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    cell = Cell(method="fcdd", params=dict(FAST_FCDD), dataset=PLUGIN, dataset_params={}, protocol="one_class",
                normal_class="blob", seed=0, outlier_exposure={"name": "digits", "image_size": 28})
    [row] = run_cell(cell)
    assert row["status"] == "ok", row.get("error")
    assert json.loads(row["resolved_params"])["oe_origin"] == "dataset digits (train side)"
    assert methods.METHODS["fcdd"] is not None


def test_bad_declarations_say_what_is_wrong():
    with pytest.raises(ValueError, match="mean has 1 channels, std 3"):
        Statistics(mean=(0.5,), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="std must be positive"):
        Statistics(mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="'a' has gcn_max <= gcn_min"):
        Statistics(per_class={"a": ClassStatistics(gcn_min=(2.0,), gcn_max=(1.0,))})
    from data.protocols import outlier_exposure_source

    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        outlier_exposure_source({"name": "nope"})
    with pytest.raises(ValueError, match="needs name"):
        outlier_exposure_source({"root": "/x"})


def test_index_batches_shuffles_with_the_generator_and_drops_a_lone_last_sample_on_request():
    from methods.base import index_batches

    assert [b.tolist() for b in index_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [b.tolist() for b in index_batches(5, 2, drop_single=True)] == [[0, 1], [2, 3]]
    assert [b.tolist() for b in index_batches(1, 2, drop_single=True)] == [[0]]
    a = torch.cat(list(index_batches(9, 4, torch.Generator().manual_seed(3))))
    b = torch.cat(list(index_batches(9, 4, torch.Generator().manual_seed(3))))
    assert a.tolist() == b.tolist() == torch.randperm(9, generator=torch.Generator().manual_seed(3)).tolist()
    assert sorted(a.tolist()) == list(range(9))
