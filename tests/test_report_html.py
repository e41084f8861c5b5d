"""report.html in headless Chromium (Debian's ``chromium`` package): the page loads offline, its
tables are in the DOM and every embedded image decodes; a screenshot is a real, non-blank PNG."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from test_report import main_run_rows, write_rows

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is absent (apt-get install -y chromium)")


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh one per call
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    from reports.leaderboard import build_report

    run = write_rows(tmp_path_factory.mktemp("html") / "html", main_run_rows())
    return build_report(run) / "report.html"


def test_page_renders_tables_and_images(page, tmp_path):
    done = chromium(tmp_path, page, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    n_images = page.read_text().count("<img ")
    assert n_images >= 5
    assert f'data-images-loaded="{n_images}"' in body         # every embedded PNG decoded
    n_tables = len(re.findall(r"<table[ >]", dom))
    assert n_tables >= 6 and f'data-tables="{n_tables}"' in body
    for name in ("leaderboard:mvtec:one_class:image_auroc", "reproduction", "failures", "cost"):
        assert f'data-name="{name}"' in dom
    assert "patchcore" in dom and "RuntimeError: patchcore broke on cable" in dom


def test_screenshot_is_a_nonblank_png(page, tmp_path):
    import numpy as np
    from PIL import Image

    shot = tmp_path / "shot.png"
    done = chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,1600")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005   # text and tables, not a white page
