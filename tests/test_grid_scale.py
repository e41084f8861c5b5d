"""Grid expansion at scale: cell ids never drift, and the per-cell work stays per cell.

The ids pinned here were computed on main before expansion was made linear (commits 48eb402 and
0d14cff);
a change that alters any of them would make every finished run look unfinished. Speed itself is
measured by benchmarks/scale.py; these tests pin what makes it fast: work done once per
(method, params, dataset entry, class), not once per seed.
"""
from __future__ import annotations

import hashlib
import textwrap

import pytest

from conftest import write_grid

# (cell, its cell_id, its row_id("bottle")) as main computed them
PINNED = {
    "plain": (dict(method="noop", params={}, dataset="digits", dataset_params={}, protocol="one_class",
                   normal_class="3", seed=7), "ca02ac8d667d5722", "c12680c862c3f67a"),
    "params": (dict(method="padim", params={"backbone": "resnet18", "image_size": 64, "milestones": [[2, 5]]},
                    dataset="mvtec_ad", dataset_params={"root": "/data/mvtec", "download": False, "image_size": 128},
                    protocol="one_class", normal_class="bottle", seed=0), "c8d569d5c7cc584f", "31ae138aa8ebead5"),
    "class_set": (dict(method="noop", params={"sleep_s": 0.5}, dataset="cifar10", dataset_params={"cache_dir": "/x"},
                       protocol="one_class", normal_class=("airplane", "cat"), seed=123456),
                  "6e6f6ca655072342", "7eb5f8677bbd4fda"),
    "unified": (dict(method="uniad", params={"epochs": 3}, dataset="mvtec_ad", dataset_params={}, protocol="unified",
                     normal_class="all", seed=1), "041d560aa824c5ab", "213a2c7ab6e71e2b"),
    "ood": (dict(method="msp", params={"image_size": 16}, dataset="digits", dataset_params={"image_size": 16},
                 protocol="ood", normal_class="all", seed=2, ood=("fashion_mnist", "cifar10"),
                 ood_params={"cifar10": {"root": "/r", "resize": "bilinear"}, "fashion_mnist": {"images_root": "/i"}}),
            "03cc47964a52f9b6", "edc105a731808e27"),
    "resources": (dict(method="noop", params={}, dataset="digits", dataset_params={}, protocol="one_class",
                       normal_class="0", seed=0, resources={"gpu": 0.25, "cpu": 1.0}),
                  "8595a853faffc6c9", "3173647f36779f2a"),
    # computed on main 0d14cff (outlier exposure enters the identity only when set)
    "outlier_exposure": (dict(method="fcdd", params={"anomaly_source": "oe"}, dataset="cifar10", dataset_params={},
                              protocol="one_class", normal_class="cat", seed=0,
                              outlier_exposure={"name": "cifar100", "root": "/data"}),
                         "0c79d8e103a05e5c", "f80b0cda990f3054"),
}

PIN_GRID = """
name: pin
seeds: [0, 1, 2]
datasets:
  - name: digits
    protocol: one_class
    classes: all
  - name: digits
    protocol: one_class
    classes: [[0, 1], [2, 3], 4]
    image_size: 16
  - name: digits
    protocol: ood
    classes: all
    ood: [fashion_mnist]
    image_size: 16
methods:
  - name: noop
    params: {sleep_s: [0.0, 0.01]}
    overrides: [{protocol: ood, params: {sleep_s: 0.02}}]
exclude:
  - {method: noop, class: 3}
  - {dataset: digits, class: 5, seed: 1}
  - {class: "0+1", exact: true, seed: 2}
"""


def digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def pin_grid(tmp_path):
    from orchestrator.config import load_grid

    return load_grid(write_grid(tmp_path / "pin.yaml", textwrap.dedent(PIN_GRID)))


@pytest.mark.parametrize("name", sorted(PINNED))
def test_cell_ids_are_the_ones_main_computed(name):
    from orchestrator.grid import Cell, short_hash

    fields, cell_id, row_id = PINNED[name]
    cell = Cell(**fields)
    assert cell.cell_id == cell_id == short_hash(cell.identity)
    assert cell.row_id("bottle") == row_id
    assert cell.row_id(None) == cell_id


def test_expanded_ids_drops_and_order_are_the_ones_main_computed(tmp_path):
    from orchestrator.grid import expand

    grid = pin_grid(tmp_path)
    exp = expand(grid)
    assert (len(exp.cells), len(exp.dropped)) == (65, 16)
    assert exp.cells[0].cell_id == "f9901f98813137c3" and exp.cells[-1].cell_id == "4c0a3e237b44ff24"
    assert digest(c.cell_id for c in exp.cells) == "fa29cfbb9bd2487eea517e3effec2c57ca38f20fc9838aeb7cb293b73ef7309b"
    assert digest(f"{what}|{why}" for what, why in exp.dropped) == \
        "f71dbfdfc2539849346987de041a98363050199042374452a46142d540c25711"
    assert digest(c.describe() for c in exp.cells) == \
        "481ffe18642a6e336d6a6699d5f32716c55aa4665327740436958f4cbca86bec"
    # main 0d14cff's (its to_dict gained outlier_exposure and plugins; the ids stayed)
    assert digest([repr([c.to_dict() for c in exp.cells])]) == \
        "019c6bc91926bc42776e457060872637723e85d5e8cfaa8028df0476e82d13d8"
    only = expand(grid, {"class": ["3", "0+1"], "seed": ["0", "2"]})
    assert (len(only.cells), len(only.dropped)) == (2, 10)
    assert digest(c.cell_id for c in only.cells) == "4aba352dbe9878baa6948ce7ac458a405f6f2b9d00ad6856e7df036e79324452"
    assert digest(f"{what}|{why}" for what, why in only.dropped) == \
        "640e8522bad0eedbf54f44900a0e3f94d2f9f72a4674720dc71f270fe323b463"


def reference_expand(grid, only):
    """Expansion as main did it, cell by cell: every rule and filter asked of every cell."""
    from data.protocols import resolve_classes
    from methods import METHODS
    from orchestrator.config import sweep
    from orchestrator.grid import Cell, _matches, _selected, short_hash

    cells, dropped, seen = [], [], set()
    plugins = tuple(spec.to_dict() for spec in grid.plugin_specs)
    for d in grid.datasets:
        classes = ["all"] if d.protocol in ("unified", "ood") and d.classes == "all" else \
            resolve_classes(d.name, d.params, d.classes)
        for m in grid.methods:
            cls = METHODS[m.name]
            if d.protocol not in cls.protocols:
                continue
            for params in sweep(m.params_for(d.name, d.protocol)):
                resolved = cls.Params(**params).model_dump(mode="json", exclude_unset=True)
                for normal_class in classes:
                    for seed in grid.seeds:
                        cell = Cell(m.name, resolved, d.name, d.params, d.protocol, normal_class, seed,
                                    tuple(d.ood), d.ood_params, m.resources.model_dump(),
                                    outlier_exposure=d.outlier_exposure_spec, plugins=plugins)
                        cell_id = short_hash(cell.identity)
                        if not _selected(cell, only) or cell_id in seen:
                            continue
                        if any(_matches(rule, cell) for rule in grid.exclude):
                            dropped.append(cell_id)
                            continue
                        seen.add(cell_id)
                        cells.append(cell_id)
    return cells, dropped


@pytest.mark.parametrize("only", [{}, {"seed": ["1"]}, {"class": ["2"]}, {"class": ["0+1", "9"], "seed": ["0", "2"]},
                                  {"protocol": ["ood"]}, {"method": ["noop"], "class": ["all"]}, {"seed": ["7"]}])
def test_grouped_matching_agrees_with_asking_every_cell(tmp_path, only):
    from orchestrator.grid import expand

    grid = pin_grid(tmp_path)
    exp = expand(grid, only)
    cells, dropped = reference_expand(grid, only)
    assert [c.cell_id for c in exp.cells] == cells
    assert [what.split()[0] for what, why in exp.dropped if why == "excluded by the grid"] == dropped


def test_template_ids_equal_the_identity_hash_and_fall_back_on_a_placeholder_in_the_data(tmp_path):
    from orchestrator.grid import _CLASS_SLOT, _SEED_SLOT, Cell, _identity_class, _IdTemplate, canonical, short_hash

    for fields, _, _ in PINNED.values():
        template = _IdTemplate(Cell(**{**fields, "normal_class": _CLASS_SLOT, "seed": _SEED_SLOT}))
        assert template.ok
        for normal_class in (fields["normal_class"], ("a", "b"), "all", "x\"y\u00e9"):
            for seed in (0, 7, -3, 2**40):
                cell = Cell(**{**fields, "normal_class": normal_class, "seed": seed})
                assert template.cell_id(canonical(_identity_class(normal_class)), canonical(seed)) == \
                    short_hash(cell.identity)
    odd = dict(PINNED["plain"][0], params={"note": _CLASS_SLOT})  # a placeholder twice: not used
    assert not _IdTemplate(Cell(**{**odd, "normal_class": _CLASS_SLOT, "seed": _SEED_SLOT})).ok
    grid = textwrap.dedent(f"""
        name: odd
        seeds: [0, 1]
        datasets: [{{name: digits, classes: [0]}}]
        methods: [{{name: noop, params: {{kill_marker: "{_CLASS_SLOT.encode('unicode_escape').decode()}"}}}}]
        """)
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    cells = expand(load_grid(write_grid(tmp_path / "odd.yaml", grid))).cells
    assert cells[0].params["kill_marker"] == _CLASS_SLOT
    assert [c.cell_id for c in cells] == [short_hash(c.identity) for c in cells]


def test_cached_properties_stay_out_of_to_dict():
    from orchestrator.grid import _FIELDS, Cell, affinity

    fields, cell_id, _ = PINNED["ood"]
    cell = Cell(**fields)
    assert cell.cell_id == cell_id and cell.params_json and cell.data_key and affinity(cell)
    d = cell.to_dict()
    assert set(d) == set(_FIELDS) and {"cell_id", "params_json", "data_key"}.isdisjoint(d)
    again = Cell.from_dict(d)
    assert again == cell and again.cell_id == cell_id
    assert "cell_id" not in again.__dict__ or again.__dict__["cell_id"] == cell_id


def test_params_are_validated_once_per_combination_not_once_per_seed(tmp_path, monkeypatch):
    """1,000 seeds × 10 classes × 2 params: two validations in expand, two in the runner's
    affinity; each cell's id is one sha256 of a string, never a JSON encoding of its identity."""
    import orchestrator.grid as grid_module
    from methods import METHODS
    from orchestrator.config import load_grid
    from orchestrator.grid import affinity, expand

    text = textwrap.dedent(f"""
        name: many
        seeds: [{", ".join(map(str, range(1000)))}]
        datasets: [{{name: digits, protocol: one_class, classes: all}}]
        methods: [{{name: noop, params: {{sleep_s: [0.0, 0.5]}}}}]
        """)
    grid = load_grid(write_grid(tmp_path / "many.yaml", text))
    params_cls = METHODS["noop"].Params
    built, encoded = [], []
    real_init, real_canonical = params_cls.__init__, grid_module.canonical

    def counting_init(self, **kw):
        built.append(kw)
        real_init(self, **kw)

    def counting_canonical(obj):
        encoded.append(obj)
        return real_canonical(obj)

    monkeypatch.setattr(params_cls, "__init__", counting_init)
    monkeypatch.setattr(grid_module, "canonical", counting_canonical)
    cells = expand(grid).cells
    assert len(cells) == 20_000 and len({c.cell_id for c in cells}) == 20_000
    assert len(built) == 2
    assert len(encoded) < 1100   # once per seed (1,000), params and class; not per cell (20,000)
    built.clear()
    keys = {affinity(c) for c in cells}
    assert len(built) <= 2 and len(keys) == 10   # digits' 10 splits; noop shares across its params
    from orchestrator.runner import affinity as runner_affinity

    assert [runner_affinity(c) for c in cells[:50]] == [affinity(c) for c in cells[:50]]
