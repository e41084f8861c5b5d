"""Grid files: expansion, stable cell ids, filters, and a clear exit-2 error for each mistake."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, write_grid

GOOD = """
name: t
seeds: [0, 1]
datasets:
  - name: digits
    protocol: one_class
    classes: [0, 1, [2, 3]]
methods:
  - name: noop
    params: {sleep_s: [0.0, 0.01]}
  - name: noop
    params: {fail: true}
exclude:
  - {method: noop, class: 1, seed: 1}
"""


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Fail the test if anything tries to start or connect to Ray (independent of whether an
    earlier test left a Ray instance running in this process)."""
    import ray

    import orchestrator.runner

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(orchestrator.runner, "start_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def grid_of(tmp_path, text=GOOD):
    from orchestrator.config import load_grid

    return load_grid(write_grid(tmp_path / "g.yaml", textwrap.dedent(text)))


def test_expansion_counts_sweeps_sets_and_exclusions(tmp_path):
    from orchestrator.grid import expand

    exp = expand(grid_of(tmp_path))
    # 3 param combos x 3 class entries x 2 seeds = 18, minus class 1 seed 1 (3 combos)
    assert len(exp.cells) == 15
    assert sum(1 for what, why in exp.dropped if why == "excluded by the grid") == 3
    assert {c.class_label for c in exp.cells} == {"0", "1", "2+3"}
    assert {c.params.get("sleep_s") for c in exp.cells} == {0.0, 0.01, None}
    assert len({c.cell_id for c in exp.cells}) == 15


def test_cell_id_is_stable_and_ignores_grid_order_and_location(tmp_path):
    from orchestrator.grid import Cell, expand

    ids = {c.cell_id for c in expand(grid_of(tmp_path)).cells}
    reordered = GOOD.replace("classes: [0, 1, [2, 3]]", "classes: [[2, 3], 1, 0]").replace("seeds: [0, 1]", "seeds: [1, 0]")
    assert {c.cell_id for c in expand(grid_of(tmp_path, reordered)).cells} == ids
    cell = Cell("noop", {"sleep_s": 0.0}, "mvtec", {"root": "/a"}, "one_class", "bottle", 0)
    moved = Cell("noop", {"sleep_s": 0.0}, "mvtec", {"root": "/elsewhere"}, "one_class", "bottle", 0)
    other_seed = Cell("noop", {"sleep_s": 0.0}, "mvtec", {"root": "/a"}, "one_class", "bottle", 1)
    assert cell.cell_id == moved.cell_id != other_seed.cell_id
    assert Cell.from_dict(cell.to_dict()) == cell
    assert cell.row_id(None) == cell.cell_id != cell.row_id("bottle")


def test_only_filters(tmp_path):
    from orchestrator.grid import expand

    g = grid_of(tmp_path)
    cells = expand(g, {"class": ["2+3"], "seed": ["0"]}).cells
    assert {(c.class_label, c.seed) for c in cells} == {("2+3", 0)} and len(cells) == 3
    assert expand(g, {"method": ["nope"]}).cells == []


def test_incompatible_protocol_is_dropped_with_reason(tmp_path, monkeypatch):
    from methods import METHODS
    from orchestrator.grid import expand

    monkeypatch.setattr(METHODS["noop"], "protocols", {"ood"})
    exp = expand(grid_of(tmp_path))
    assert exp.cells == []
    assert any("does not support protocol 'one_class'" in why for _, why in exp.dropped)


BAD = {
    "malformed YAML": ("name: t\nseeds: [0\n", "malformed YAML"),
    "unknown method": (GOOD.replace("name: noop\n    params: {fail: true}", "name: padimm\n    params: {}"),
                       "methods[1].name: unknown method 'padimm'"),
    "unknown dataset": (GOOD.replace("name: digits", "name: digitz"), "datasets[0].name: unknown dataset 'digitz'"),
    "unknown class": (GOOD.replace("[0, 1, [2, 3]]", "[0, 11]"), "datasets[0] (digits).classes"),
    "unknown parameter": (GOOD.replace("{fail: true}", "{fial: true}"), "methods[1] (noop).params.fial: unknown parameter; valid:"),
    "unknown protocol": (GOOD.replace("protocol: one_class", "protocol: one-class"), "unknown protocol 'one-class'"),
    "wrong type": (GOOD.replace("{fail: true}", "{sleep_s: soon}"), "methods[1] (noop).params.sleep_s"),
    "wrong type of seeds": (GOOD.replace("seeds: [0, 1]", "seeds: zero"), "seeds"),
    "missing methods": ("name: t\ndatasets: [{name: digits}]\n", "methods: Field required"),
    "name leaving --results": (GOOD.replace("name: t\nseeds", "name: ..\nseeds"), "name: String should match"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_grid_exits_2_before_ray_with_named_entry(tmp_path, kind, capsys, ray_must_not_start):
    import bench

    text, expected = BAD[kind]
    path = write_grid(tmp_path / "bad.yaml", text)
    assert bench.main([str(path), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    if kind in ("unknown method", "unknown dataset", "unknown protocol", "unknown parameter"):
        assert "valid:" in err
    assert not (tmp_path / "r").exists()


def test_bad_grid_exit_code_from_the_command_line(tmp_path):
    path = write_grid(tmp_path / "bad.yaml", BAD["unknown method"][0])
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), str(path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "unknown method 'padimm'" in out.stderr and "noop" in out.stderr


def test_dry_run_prints_cells_count_and_drops(tmp_path, capsys, ray_must_not_start):
    import bench

    path = write_grid(tmp_path / "g.yaml", textwrap.dedent(GOOD))
    assert bench.main([str(path), "--dry-run", "--only", "seed=0"]) == 0
    out = capsys.readouterr().out
    assert "9 cells (0 dropped)" in out and "dropped:" not in out
    assert sum(1 for line in out.splitlines() if "noop {" in line) == 9
    assert bench.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "15 cells (3 dropped)" in out
    assert out.count("dropped: ") == 3 and "excluded by the grid" in out


def test_bad_only_key_exits_2(tmp_path, capsys):
    import bench

    path = write_grid(tmp_path / "g.yaml", textwrap.dedent(GOOD))
    assert bench.main([str(path), "--dry-run", "--only", "colour=red"]) == 2
    assert "KEY one of" in capsys.readouterr().err


def test_demo_grid_lists_every_registered_method_and_validates():
    from methods import METHODS
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    grid = load_grid(ROOT / "grids" / "demo.yaml")
    assert {m.name for m in grid.methods} == set(METHODS)
    assert {c.method for c in expand(grid).cells} == set(METHODS)


SETS = """
name: t
seeds: [0]
datasets:
  - name: digits
    protocol: one_class
    classes: [2, 3, [2, 3], [4, 5]]
  - name: synthetic
    protocol: one_class
    classes: all
methods:
  - name: noop
exclude:
  - RULE
"""


@pytest.mark.parametrize("rule, kept", [
    ("{dataset: digits, class: 2}", {"3", "4+5"}),        # a class also drops the sets holding it
    ("{dataset: digits, class: 2, exact: true}", {"3", "2+3", "4+5"}),  # exact: the class alone
    ("{class: [3, 2]}", {"2", "3", "4+5"}),               # a class set matches exactly that set
    ("{class: 2+3}", {"2", "3", "4+5"}),
    ("{dataset: digits, class_set: true}", {"2", "3"}),
    ("{dataset: digits, class_set: false}", {"2+3", "4+5"}),
    ("{dataset: digits, class: 4, class_set: true}", {"2", "3", "2+3"}),
])
def test_exclude_class_matching(tmp_path, rule, kept):
    from orchestrator.grid import expand

    cells = expand(grid_of(tmp_path, SETS.replace("RULE", rule))).cells
    assert {c.class_label for c in cells if c.dataset == "digits"} == kept
    assert len([c for c in cells if c.dataset == "synthetic"]) == 4


def test_only_class_takes_indices_in_the_cells_dataset(tmp_path):
    from orchestrator.grid import expand

    grid = grid_of(tmp_path, SETS.replace("RULE", "{seed: 7}"))
    cells = expand(grid, {"class": ["2"]}).cells        # digits "2" (and the set 2+3); synthetic "disc"
    assert {c.class_label for c in cells} == {"2", "2+3", "disc"}
    assert {c.class_label for c in expand(grid, {"class": ["granite"]}).cells} == {"granite"}
    assert {c.class_label for c in expand(grid, {"class": ["4+5"]}).cells} == {"4+5"}


def test_exclude_class_by_index_resolves_in_the_cells_dataset(tmp_path):
    from orchestrator.grid import expand

    # synthetic's class 2 is "disc"; digits' class 2 is "2": one rule, each dataset's own class
    cells = expand(grid_of(tmp_path, SETS.replace("RULE", "{class: 2, exact: true}"))).cells
    assert {c.class_label for c in cells if c.dataset == "synthetic"} == {"weave", "granite", "chip"}
    cells = expand(grid_of(tmp_path, SETS.replace("RULE", "{class: disc}"))).cells
    assert {c.class_label for c in cells if c.dataset == "synthetic"} == {"weave", "granite", "chip"}
    assert len([c for c in cells if c.dataset == "digits"]) == 4


OVERRIDES = """
name: t
seeds: [0]
datasets:
  - name: digits
    protocol: one_class
    classes: [0]
  - name: synthetic
    protocol: one_class
    classes: [weave]
methods:
  - name: noop
    params: {sleep_s: 0.0, fail: false}
    overrides:
      - {dataset: digits, params: {sleep_s: [0.01, 0.02]}}
      - {dataset: digits, protocol: one_class, params: {fail: true}}
"""


def test_overrides_replace_params_on_the_datasets_they_select(tmp_path):
    from orchestrator.grid import expand

    cells = expand(grid_of(tmp_path, OVERRIDES)).cells
    by_dataset = {}
    for c in cells:
        by_dataset.setdefault(c.dataset, []).append(c.params)
    assert by_dataset["synthetic"] == [{"sleep_s": 0.0, "fail": False}]
    # an override's list value is a sweep, like a method's own; later overrides win
    assert sorted(p["sleep_s"] for p in by_dataset["digits"]) == [0.01, 0.02]
    assert all(p["fail"] is True for p in by_dataset["digits"])
    assert len({c.cell_id for c in cells}) == 3


@pytest.mark.parametrize("override, expected", [
    ("{dataset: digitz, params: {fail: true}}", "overrides[0].dataset: unknown dataset 'digitz'"),
    ("{dataset: digits, params: {fial: true}}", "(noop).overrides[0].params.fial: unknown parameter"),
    ("{dataset: mnist, params: {fail: true}}", "overrides[0]: selects no dataset entry"),
    ("{protocol: odd, params: {fail: true}}", "overrides[0].protocol: unknown protocol 'odd'"),
    ("{dataset: digits}", "params: Field required"),
])
def test_bad_override_exits_2(tmp_path, capsys, ray_must_not_start, override, expected):
    import bench

    text = OVERRIDES.replace("- {dataset: digits, params: {sleep_s: [0.01, 0.02]}}", "- " + override)
    path = write_grid(tmp_path / "bad.yaml", textwrap.dedent(text))
    assert bench.main([str(path), "--dry-run"]) == 2
    assert expected in capsys.readouterr().err


def test_bad_exclude_class_exits_2(tmp_path, capsys, ray_must_not_start):
    import bench

    path = write_grid(tmp_path / "bad.yaml", SETS.replace("RULE", "{dataset: digits, class: 12}"))
    assert bench.main([str(path), "--dry-run"]) == 2
    assert "exclude[0].class: digits: unknown class 12" in capsys.readouterr().err


MVTEC_CATEGORIES = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]


def test_full_grid_expands_to_the_papers_cells(tmp_path, monkeypatch):
    """grids/full.yaml on a stand-in MVTec AD tree at the default root: each method on its papers'
    datasets only, UniAD on class sets and unified MVTec, FCDD with outlier exposure where the
    official runners use it."""
    from collections import Counter

    from data_writers import write_mvtec_category
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    monkeypatch.setenv("HOME", str(tmp_path))
    for category in MVTEC_CATEGORIES:
        write_mvtec_category(tmp_path / "data" / "mvtec_anomaly_detection", category, n_train=1, n_good=1,
                             defects={"crack": 1})
    cells = expand(load_grid(ROOT / "grids" / "full.yaml")).cells
    kinds = Counter((c.method, c.dataset, c.protocol, "set" if isinstance(c.normal_class, tuple) else "one")
                    for c in cells)
    assert kinds[("uniad", "cifar10", "one_class", "set")] == 4 * 3
    assert kinds[("uniad", "mvtec", "unified", "one")] == 3
    assert not any(k[0] == "uniad" and k[3] == "one" and k[2] == "one_class" for k in kinds)
    assert kinds[("kdad", "cifar10", "one_class", "one")] == 10 * 3
    assert not any(k[3] == "set" and k[0] != "uniad" for k in kinds)
    assert kinds[("patchcore", "mvtec", "one_class", "one")] == 15 * 3
    assert {k[1] for k in kinds if k[0] == "dsvdd"} == {"mnist", "cifar10"}
    sources = {(c.method, c.dataset): c.params.get("anomaly_source", "confetti")
               for c in cells if c.method in ("fcdd", "fcdd_hsc")}
    assert sources == {("fcdd", "fashion_mnist"): "oe", ("fcdd", "cifar10"): "oe", ("fcdd", "mvtec"): "confetti",
                       ("fcdd_hsc", "fashion_mnist"): "oe", ("fcdd_hsc", "cifar10"): "oe",
                       ("fcdd_hsc", "mvtec"): "confetti"}
    assert all(c.params["oe_dataset"] == "cifar100" for c in cells if c.params.get("anomaly_source") == "oe")


def test_dry_run_plans_mvtec_without_its_files_and_a_run_still_refuses(tmp_path, capsys, monkeypatch,
                                                                       ray_must_not_start):
    """Without MVTec AD at the default root, --dry-run lists the full grid with the 15 published
    categories (and says so); the same grid run for real exits 2 with the layout message."""
    import bench

    monkeypatch.setenv("HOME", str(tmp_path))
    grid = ROOT / "grids" / "full.yaml"
    assert bench.main([str(grid), "--dry-run", "--only", "method=patchcore", "--only", "seed=0"]) == 0
    out = capsys.readouterr().out
    assert out.count("planned without data: mvtec: root") == 1 and "15 published classes" in out
    planned = [line for line in out.splitlines() if "patchcore" in line and "mvtec/one_class" in line]
    assert sorted(line.split("class=")[1].split()[0] for line in planned) == MVTEC_CATEGORIES
    assert bench.main([str(grid), "--only", "method=patchcore"]) == 2
    err = capsys.readouterr().err
    assert "mvtec: root" in err and "Expected layout" in err


@pytest.mark.parametrize("value", [".nan", ".inf", "-1.0e-3", "0"])
def test_a_learning_rate_must_be_positive_and_finite(tmp_path, capsys, ray_must_not_start, value):
    """A NaN, infinite, zero or negative learning rate fails the grid, naming the entry, instead of
    every cell failing at run time."""
    import bench

    text = GOOD.replace("name: noop\n    params: {fail: true}", f"name: dcae\n    params: {{ae_lr: [1.0e-4, {value}]}}")
    path = write_grid(tmp_path / "bad.yaml", text)
    assert bench.main([str(path), "--results", str(tmp_path / "r")]) == 2
    assert "methods[1] (dcae).params.ae_lr" in capsys.readouterr().err


def test_every_learning_rate_parameter_is_validated():
    """Every registered method's learning-rate fields (lr, *_lr) reject NaN, inf, 0 and negatives:
    a method added later with a plain float learning rate fails here (use methods.base.LearningRate)."""
    from pydantic import ValidationError

    from methods import METHODS

    checked = 0
    for name, cls in sorted(METHODS.items()):
        for field in cls.Params.model_fields:
            if field == "lr" or field.endswith("_lr"):
                for bad in (float("nan"), float("inf"), 0.0, -1e-3):
                    with pytest.raises(ValidationError) as err:
                        cls.Params(**{field: bad})
                    assert any(e["loc"] == (field,) for e in err.value.errors()), (name, field, bad)
                checked += 1
    assert checked >= 10
