"""Plugins run exactly like built-ins: the examples through a real local Ray grid into rows and the
report, entry-point discovery from a package installed in the test, every bad plugin exits 2 naming
its file, and a method breaking the score contract gives a failed row that says how."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import bench
from conftest import ROOT
from test_cluster import two_node_cluster  # noqa: F401  (a fixture)

EXAMPLES = ROOT / "examples"
TINY = "{backbone: resnet18, pretrained: false, image_size: 32, crop: 32, batch_size: 16}"


@pytest.fixture(autouse=True)
def _no_plugins_left():
    """Each test starts and ends with the built-ins alone (the registries are process-wide)."""
    from plugins.loader import unload_all

    unload_all()
    yield
    unload_all()


@pytest.fixture
def ray_must_not_start(monkeypatch):
    import orchestrator.runner

    def refuse(*a, **k):
        raise AssertionError("Ray must not start for a bad plugin")

    monkeypatch.setattr(orchestrator.runner, "start_ray", refuse)


def run_bench(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = bench.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def write_csv_images(folder: Path, n_train: int = 16, n_good: int = 6, n_bad: int = 6) -> tuple[Path, Path]:
    """A user's own labelled images: smooth noise textures, anomalous ones with a bright square and
    its mask; CSVs with paths relative to themselves (images in a sub-folder)."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)

    def texture() -> np.ndarray:
        base = rng.normal(100, 12, (8, 8, 3)).clip(0, 255).astype(np.uint8)
        return np.array(Image.fromarray(base).resize((32, 32), Image.BILINEAR))

    train = ["path,label"]
    for i in range(n_train):
        Image.fromarray(texture()).save(folder / "img" / f"train_{i}.png")
        train.append(f"img/train_{i}.png,normal")
    test = ["path,label,mask"]
    for i in range(n_good):
        Image.fromarray(texture()).save(folder / "img" / f"good_{i}.png")
        test.append(f"img/good_{i}.png,normal,")
    for i in range(n_bad):
        img, mask = texture(), np.zeros((32, 32), np.uint8)
        y, x = rng.integers(4, 20, 2)
        img[y:y + 9, x:x + 9] = 250
        mask[y:y + 9, x:x + 9] = 255
        Image.fromarray(img).save(folder / "img" / f"bad_{i}.png")
        Image.fromarray(mask).save(folder / "img" / f"bad_{i}_mask.png")
        test.append(f"img/bad_{i}.png,anomalous,img/bad_{i}_mask.png")
    (folder / "train.csv").write_text("\n".join(train) + "\n")
    (folder / "test.csv").write_text("\n".join(test) + "\n")
    return folder / "train.csv", folder / "test.csv"


@pytest.mark.slow
def test_both_examples_run_through_a_local_ray_grid_into_rows_and_the_report(ray_local, tmp_path, capsys):
    train_csv, test_csv = write_csv_images(tmp_path / "mine")
    grid_dir = tmp_path / "grids"
    grid_dir.mkdir()
    rel = os.path.relpath(EXAMPLES, grid_dir)   # plugin paths are relative to the grid file
    grid = grid_dir / "plugins.yaml"
    grid.write_text(textwrap.dedent(f"""\
        name: plugin_demo
        plugins: [{rel}/pyod_detector.py, {rel}/csv_images.py]
        datasets:
          - {{name: digits, classes: [0]}}
          - {{name: csv_images, train_csv: {train_csv}, test_csv: {test_csv}, class_name: tiles}}
        methods:
          - {{name: pyod, params: {TINY}}}
          - {{name: pyod, params: {{backbone: resnet18, pretrained: false, image_size: 32, crop: 32, detector: ecod}}}}
          - {{name: padim, params: {TINY}}}
        """))
    status, out, err = run_bench([grid, "--results", tmp_path / "results", "--quiet", "--workers", "1"], capsys)
    assert status == 0, out + err
    rows = pd.read_parquet(tmp_path / "results" / "plugin_demo" / "rows")
    assert len(rows) == 6 and (rows["status"] == "ok").all(), rows[["method", "dataset", "error"]]
    assert rows["image_auroc"].notna().all()
    # the plugin dataset's masks reach the metrics: padim scores its pixels
    assert rows[(rows["dataset"] == "csv_images") & (rows["method"] == "padim")]["pixel_auroc"].notna().all()
    sha = hashlib.sha256((EXAMPLES / "pyod_detector.py").read_bytes()).hexdigest()
    assert set(rows[rows["method"] == "pyod"]["method_source"]) == {f"file:pyod_detector.py@sha256:{sha}"}
    assert set(rows[rows["method"] == "padim"]["method_source"]) == {"builtin"}
    assert rows["git_sha"].notna().all()
    # one worker, one split per dataset: the three methods share the frozen features (one miss each)
    for _, g in rows.groupby("dataset"):
        assert sorted(g["feature_cache_hit"]) == [False, True, True], g[["method", "feature_cache_hit"]]
    # the two pyod sweeps are distinct cells, the plugin dataset's cells carry its class name
    assert rows["base_cell_id"].nunique() == 6
    assert set(rows[rows["dataset"] == "csv_images"]["normal_class"]) == {"tiles"}
    report = (tmp_path / "results" / "plugin_demo" / "report" / "report.md").read_text()
    assert "## Method sources" in report and f"plugin method pyod: file:pyod_detector.py@sha256:{sha[:12]}" in report
    board = pd.read_parquet(tmp_path / "results" / "plugin_demo" / "report" / "leaderboard.parquet")
    assert {"pyod", "padim"} <= {v.split(" ")[0] for v in board["variant"]}


def test_list_with_a_grid_shows_the_plugins_and_the_same_built_ins(tmp_path, capsys):
    status, plain, _ = run_bench(["list"], capsys)
    assert status == 0
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\nplugins: [{EXAMPLES}/pyod_detector.py, {EXAMPLES / 'csv_images.py'}]\n"
                    "datasets: [{name: csv_images}]\nmethods: [{name: pyod}]\n")
    status, listed, err = run_bench(["list", grid], capsys)
    assert status == 0, err
    assert "pyod  protocols: one_class, unified" in listed and "(plugin: file:pyod_detector.py@sha256:" in listed
    assert "    detector = 'knn'\n    n_neighbors = 5" in listed
    assert "  csv_images  (plugin: file:csv_images.py@sha256:" in listed and "    train_csv = required" in listed

    def without_plugins(text: str) -> str:   # drop each plugin's block: header line and its indented fields
        keep, skipping = [], False
        for line in text.splitlines():
            if line.startswith("  ") and not line.startswith("    "):
                skipping = "(plugin: " in line
            if not skipping:
                keep.append(line)
        return "\n".join(keep)

    assert without_plugins(listed) == plain.rstrip("\n")


def test_the_registry_is_one_implementation_with_sources():
    from data import DATASETS, register_dataset
    from methods import METHODS, register
    from plugins.registry import Registry, RegistryError

    assert isinstance(METHODS, Registry) and isinstance(DATASETS, Registry) and type(METHODS) is type(DATASETS)
    assert "padim" in METHODS and sorted(METHODS) == sorted(METHODS.keys()) and METHODS["padim"].name == "padim"
    assert {METHODS.source(n) for n in METHODS} == {"builtin"} == {DATASETS.source(n) for n in DATASETS}
    with pytest.raises(RegistryError, match="method 'padim' registered twice: builtin clashes with the built-in"):
        register("padim")(type("Again", (), {}))
    with pytest.raises(RegistryError, match="dataset 'digits' registered twice"):
        register_dataset("digits")(type("Again", (), {}))
    with pytest.raises(KeyError, match="unknown method 'nope'; valid: "):
        METHODS.create("nope", {})


# ------------------------------------------------------------------------- bad plugins
GOOD_METHOD = """
import numpy as np
from methods import Method, MethodParams, Scores, register

class P(MethodParams):
    k: int = 1

@register({name!r})
class M(Method):
    Params = P
    def fit(self, train):
        pass
    def score(self, test):
        return Scores(image=np.arange(len(test), dtype=float))
"""

BAD_PLUGINS = {
    "missing": (None, r"plugin missing\.py: no such file .*missing\.py"),
    "import_error": ("import numpy\nimport adgrid_no_such_module_xyz\n",
                     r"plugin import_error\.py: import failed \(line 2\): ModuleNotFoundError: "
                     r"No module named 'adgrid_no_such_module_xyz'"),
    "syntax_error": ("def broken(:\n", r"plugin syntax_error\.py: import failed.*SyntaxError"),
    "clash_builtin": (GOOD_METHOD.format(name="padim"),
                      r"plugin clash_builtin\.py: method 'padim' registered twice: file:clash_builtin\.py@sha256:"
                      r"[0-9a-f]{64} clashes with the built-in"),
    "no_score": (GOOD_METHOD.format(name="no_score").replace("def score", "def scored"),
                 r"plugin no_score\.py: method 'no_score' \(M\) has no score method \(the method contract: "
                 r"fit, score and Params\)"),
    "no_params": (GOOD_METHOD.format(name="no_params").replace("Params = P", "Params = dict"),
                  r"plugin no_params\.py: method 'no_params' \(M\) has no Params"),
    "not_a_method": ("from methods import register\n@register('plain')\nclass Plain:\n"
                     "    Params = None\n    def fit(self, t): pass\n    def score(self, t): pass\n",
                     r"plugin not_a_method\.py: method 'plain' \(Plain\) is not a subclass of methods\.base\.Method"),
    "no_load": ("from data import Dataset, register_dataset\n@register_dataset('noload')\n"
                "class D(Dataset):\n    def classes(self): return ['a']\n",
                r"plugin no_load\.py: dataset 'noload' \(D\) has no load method"),
    "registers_nothing": ("x = 1\n", r"plugin registers_nothing\.py: registers no method or dataset"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_a_bad_plugin_exits_2_before_ray_starts_naming_its_file(case, tmp_path, capsys, ray_must_not_start):
    from data import DATASETS
    from methods import METHODS

    source, message = BAD_PLUGINS[case]
    if source is not None:
        (tmp_path / f"{case}.py").write_text(source)
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: g\nplugins: [{case}.py]\ndatasets: [{{name: digits, classes: [0]}}]\n"
                    "methods: [{name: noop}]\n")
    before = (dict(METHODS.sources()), dict(DATASETS.sources()))
    status, out, err = run_bench([grid, "--results", tmp_path / "results"], capsys)
    assert status == 2, out + err
    assert err.startswith(f"error: {grid}: plugin {case}.py"), err
    assert re.search(message, err), err
    assert (dict(METHODS.sources()), dict(DATASETS.sources())) == before   # nothing half-registered
    assert not (tmp_path / "results").exists()
    status, _, err2 = run_bench(["list", grid], capsys)   # list GRID says the same
    assert status == 2 and re.search(message, err2)


def test_two_plugins_registering_one_name_clash(tmp_path, capsys, ray_must_not_start):
    (tmp_path / "one.py").write_text(GOOD_METHOD.format(name="mine"))
    (tmp_path / "two.py").write_text(GOOD_METHOD.format(name="mine"))
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nplugins: [one.py, two.py]\ndatasets: [{name: digits, classes: [0]}]\n"
                    "methods: [{name: mine}]\n")
    status, out, err = run_bench([grid, "--results", tmp_path / "results"], capsys)
    assert status == 2
    assert "plugin two.py: method 'mine' registered twice: file:two.py@sha256:" in err
    assert "clashes with the one from file:one.py@sha256:" in err


# ------------------------------------------------------------------------- run-time contract
@pytest.mark.parametrize("body, error", [
    ("return Scores(image=np.zeros(max(1, len(test) - 3)))",
     "ScoreContractError: score returned {m} image scores for {n} test images"),
    ("s = np.arange(len(test), dtype=float); s[:3] = np.nan; return Scores(image=s)",
     "ScoreContractError: score returned 3 non-finite image scores (NaN or inf) of {n}"),
    ("return Scores(image=np.arange(len(test), dtype=float), pixel=np.full((len(test), 4, 4), np.inf))",
     "ScoreContractError: score returned {p} non-finite pixel scores (NaN or inf)"),
])
def test_a_plugin_breaking_the_score_contract_gives_a_failed_row_saying_which(tmp_path, body, error):
    from orchestrator.cell import run_cell
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    (tmp_path / "bad_scores.py").write_text(
        GOOD_METHOD.format(name="bad_scores").replace("return Scores(image=np.arange(len(test), dtype=float))", body))
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nplugins: [bad_scores.py]\ndatasets: [{name: digits, classes: [0]}]\n"
                    "methods: [{name: bad_scores}]\n")
    (cell,) = expand(load_grid(grid)).cells
    assert cell.plugins and cell.plugins[0]["kind"] == "file"   # the worker's copy of the plugin list
    (row,) = run_cell(cell)
    from data.protocols import make_splits

    n = len(make_splits("digits", {}, "one_class", "0", seed=0)[1][0][1])
    assert row["status"] == "failed"
    assert row["error"] == error.format(n=n, m=max(1, n - 3), p=n * 16), row["error"]
    assert row["method_source"].startswith("file:bad_scores.py@sha256:")


# ------------------------------------------------------------------------- entry points
def install_test_package(site: Path) -> None:
    """A small distribution, as pip would install it: a package and its dist-info with entry points
    (a class under its entry-point name, and a module whose decorator registers a dataset)."""
    pkg = site / "adgrid_test_ext"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent("""\
        import numpy as np
        from methods import Method, MethodParams, Scores

        class RankParams(MethodParams):
            reverse: bool = False

        class Rank(Method):
            '''Scores each test image by its mean brightness.'''
            Params = RankParams
            def fit(self, train):
                pass
            def score(self, test):
                s = np.asarray([np.asarray(i, dtype=float).mean() for i in test.images])
                return Scores(image=-s if self.params.reverse else s)
        """))
    (pkg / "blobs.py").write_text(textwrap.dedent("""\
        import numpy as np
        from data import Dataset, RawData, register_dataset
        from data.base import DatasetParams

        class BlobParams(DatasetParams):
            n: int = 12

        @register_dataset("ext_blobs")
        class Blobs(Dataset):
            '''Two classes: dark and bright 8x8 images.'''
            Params = BlobParams
            def classes(self):
                return ["dark", "bright"]
            def load(self, side, classes=None):
                rng = np.random.default_rng(0 if side == "train" else 1)
                n = self.params.n
                targets = np.repeat([0, 1], n)
                images = (rng.integers(0, 60, (2 * n, 8, 8, 1)) + 150 * targets[:, None, None, None]).astype(np.uint8)
                keep = np.isin(targets, [self.classes().index(c) for c in (classes or self.classes())])
                return RawData(images=images[keep], targets=targets[keep], class_names=self.classes())
        """))
    info = site / "adgrid_test_ext-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: adgrid-test-ext\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("adgrid_test_ext\n")
    (info / "entry_points.txt").write_text("[adgrid.methods]\next_rank = adgrid_test_ext:Rank\n\n"
                                           "[adgrid.datasets]\next_blobs = adgrid_test_ext.blobs\n")


def test_entry_points_of_an_installed_package_are_discovered(tmp_path, monkeypatch, capsys):
    from methods import METHODS
    from orchestrator.cell import run_cell
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    install_test_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    status, listed, err = run_bench(["list"], capsys)
    assert status == 0, err
    assert "  ext_rank  protocols: one_class  (plugin: package:adgrid-test-ext==0.1)\n    reverse = False" in listed
    assert "  ext_blobs  (plugin: package:adgrid-test-ext==0.1)\n    n = 12" in listed
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\ndatasets: [{name: ext_blobs, classes: [dark], n: 10}]\n"
                    "methods: [{name: ext_rank}, {name: ext_rank, params: {reverse: [true]}}]\n")
    cells = expand(load_grid(grid)).cells
    assert len(cells) == 2 and all(c.plugins for c in cells)
    rows = [row for cell in cells for row in run_cell(cell)]
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    assert {r["method_source"] for r in rows} == {"package:adgrid-test-ext==0.1"}
    assert sorted(r["image_auroc"] for r in rows) == [0.0, 1.0]   # bright is anomalous; reversed: worst
    assert METHODS.source("ext_rank") == "package:adgrid-test-ext==0.1"
    # a grid plugin cannot take a name an installed package registered
    (tmp_path / "mine.py").write_text(GOOD_METHOD.format(name="ext_rank"))
    grid.write_text("name: g\nplugins: [mine.py]\ndatasets: [{name: ext_blobs}]\nmethods: [{name: ext_rank}]\n")
    status, _, err = run_bench([grid, "--results", tmp_path / "r"], capsys)
    assert status == 2 and "plugin mine.py: method 'ext_rank' registered twice" in err
    assert "clashes with the one from package:adgrid-test-ext==0.1" in err


# ------------------------------------------------------------------------- workers, clusters
def test_a_worker_loads_a_shipped_plugin_file_by_name_and_hash(tmp_path, monkeypatch):
    """On a cluster node the grid's path does not exist: the file comes with the job's py_modules
    (a folder on sys.path); only the same content is accepted."""
    from methods import METHODS
    from plugins.loader import PluginError, ensure_loaded, resolve, ship_paths, unload_all

    here = tmp_path / "driver"
    here.mkdir()
    (here / "shipped.py").write_text(GOOD_METHOD.format(name="shipped"))
    (spec,) = resolve(["shipped.py"], here)
    assert ship_paths([spec]) == [str(here / "shipped.py")]
    moved = dict(spec.to_dict(), target=str(tmp_path / "elsewhere" / "shipped.py"))
    with pytest.raises(PluginError, match="is not on this machine and no shipped.py with sha256"):
        ensure_loaded([moved])
    node = tmp_path / "node"
    node.mkdir()
    (node / "shipped.py").write_text(GOOD_METHOD.format(name="shipped") + "\n# edited\n")
    monkeypatch.syspath_prepend(str(node))
    with pytest.raises(PluginError, match="is not on this machine"):
        ensure_loaded([moved])   # a file of that name but other content is not the plugin
    (node / "shipped.py").write_text(GOOD_METHOD.format(name="shipped"))
    ensure_loaded([moved])
    assert METHODS.source("shipped") == spec.source
    ensure_loaded([moved])   # once per process
    unload_all()
    sys.path.remove(str(node))
    (here / "shipped.py").write_text(GOOD_METHOD.format(name="shipped") + "\n# changed mid-run\n")
    with pytest.raises(PluginError, match="changed since the run started"):
        ensure_loaded([spec.to_dict()])


def test_a_module_plugin_from_the_grid_folder(tmp_path, capsys):
    from methods import METHODS
    from orchestrator.config import load_grid
    from plugins.loader import ship_paths

    pkg = tmp_path / "my_package"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import detectors\n")   # registers as the package is found
    (pkg / "detectors.py").write_text(GOOD_METHOD.format(name="pkg_method"))
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nplugins: [my_package.detectors]\ndatasets: [{name: digits, classes: [0]}]\n"
                    "methods: [{name: pkg_method, params: {k: 3}}]\n")
    loaded = load_grid(grid)
    sha = hashlib.sha256((pkg / "detectors.py").read_bytes()).hexdigest()
    assert METHODS.source("pkg_method") == f"module:my_package.detectors@sha256:{sha}"
    assert ship_paths(list(loaded.plugin_specs)) == [str(pkg)]   # the package travels to a cluster
    grid.write_text("name: g\nplugins: [no_such_pkg.mod]\ndatasets: [{name: digits}]\nmethods: [{name: noop}]\n")
    status, _, err = run_bench([grid, "--dry-run"], capsys)
    assert status == 2 and "plugin no_such_pkg.mod: no module named 'no_such_pkg.mod'" in err
    (tmp_path / "broken_pkg").mkdir()
    (tmp_path / "broken_pkg" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    grid.write_text("name: g\nplugins: [broken_pkg.mod]\ndatasets: [{name: digits}]\nmethods: [{name: noop}]\n")
    status, _, err = run_bench([grid, "--dry-run"], capsys)
    assert status == 2 and "plugin broken_pkg.mod: import failed: RuntimeError: boom" in err, err


# ------------------------------------------------------------------------- report
def test_the_report_warns_when_a_methods_rows_come_from_different_sources():
    from reports.provenance import provenance_blocks, source_warnings

    rows = pd.DataFrame({"method": ["pyod", "pyod", "pyod", "padim"],
                         "method_source": ["file:p.py@sha256:" + "a" * 64, "file:p.py@sha256:" + "a" * 64,
                                           "file:p.py@sha256:" + "b" * 64, "builtin"]})
    (warning,) = source_warnings(rows)
    assert warning.startswith("method pyod: its rows come from 2 different sources (file:p.py@sha256:aaaaaaaaaaaa…: 2 rows, "
                              "file:p.py@sha256:bbbbbbbbbbbb…: 1 rows)")
    assert source_warnings(rows[rows["method"] == "padim"]) == []
    assert provenance_blocks(rows[rows["method"] == "padim"]) == []
    assert provenance_blocks(rows.assign(method_source=None)) == []   # rows from before the column


CLUSTER_PLUGIN = GOOD_METHOD.format(name="cluster_plugin").replace("    def fit(self, train):", '''    def resolved_params(self):
        import sys
        from pathlib import Path
        shipped = [p for p in sys.path if "ray" in p and (Path(p) / "cluster_plugin.py").is_file()]
        return {"k": self.params.k, "shipped": bool(shipped)}
    def fit(self, train):''')


@pytest.mark.slow
def test_a_plugin_runs_on_a_two_node_cluster_shipped_with_the_job(two_node_cluster, tmp_path):
    """--address: the plugin file goes to the workers as a py_module of the job, each node's worker
    loads it before its first cell, and the rows from both nodes record its source."""
    from test_cluster import run_or_fail

    address, _, env = two_node_cluster
    (tmp_path / "cluster_plugin.py").write_text(CLUSTER_PLUGIN)
    grid = tmp_path / "g.yaml"
    grid.write_text("name: cluster\nseeds: [0, 1, 2]\nplugins: [cluster_plugin.py]\n"
                    "datasets: [{name: digits, classes: [0, 1, 2]}]\nmethods: [{name: cluster_plugin}]\n")
    run_or_fail([sys.executable, str(ROOT / "bench.py"), str(grid), "--address", address,
                 "--results", str(tmp_path / "results"), "--quiet", "--no-report"], env, tmp_path)
    df = pd.read_parquet(tmp_path / "results" / "cluster" / "rows")
    assert len(df) == 9 and (df["status"] == "ok").all(), df[["status", "error"]]
    assert set(df["node_ip"]) == {"127.0.0.2", "127.0.0.3"}
    sha = hashlib.sha256(CLUSTER_PLUGIN.encode()).hexdigest()
    assert set(df["method_source"]) == {f"file:cluster_plugin.py@sha256:{sha}"}
    assert all(json.loads(p)["shipped"] for p in df["resolved_params"])   # on every worker's path
