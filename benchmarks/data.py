"""Data layer: time to load one procedural (``synthetic``) category, both sides.

cold:        fresh cache folder: generate the PNG files, decode them into the decode cache, load.
decode-only: files already generated, decode cache emptied: decode + load.
warm:        everything cached: list + stat the files, memory-map the cached arrays.
Prints each (best of ``--repeats``) and the cold / warm ratio.

    python benchmarks/data.py [--category chip] [--image-size 128] [--n-train 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_both_sides(params: dict, category: str) -> int:
    from data import create_dataset

    ds = create_dataset("synthetic", params)
    return sum(len(ds.load(side, [category]).targets) for side in ("train", "test"))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--category", default="chip")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-test-good", type=int, default=30)
    p.add_argument("--n-test-defect", type=int, default=45)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    params = {"categories": [args.category], "image_size": args.image_size, "n_train": args.n_train,
              "n_test_good": args.n_test_good, "n_test_defect": args.n_test_defect}
    import data  # noqa: F401  (imports torch & co. outside the timings)

    cold, decode_only, warm = [], [], []
    n_images = 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["ADGRID_CACHE"] = tmp
            cold.append(timed(lambda: load_both_sides(params, args.category)))
            shutil.rmtree(Path(tmp) / "decoded")
            decode_only.append(timed(lambda: load_both_sides(params, args.category)))
            for _ in range(5):
                warm.append(timed(lambda: load_both_sides(params, args.category)))
            n_images = load_both_sides(params, args.category)
    best_cold, best_decode, best_warm = min(cold), min(decode_only), min(warm)
    print(f"synthetic/{args.category}: {n_images} images of {args.image_size}x{args.image_size}")
    print(f"cold (generate + decode + load): {best_cold * 1000:8.1f} ms")
    print(f"decode-only (files exist):       {best_decode * 1000:8.1f} ms")
    print(f"warm (decode cache hit):         {best_warm * 1000:8.1f} ms")
    print(f"cold / warm: {best_cold / best_warm:.0f}x   decode-only / warm: {best_decode / best_warm:.0f}x")


if __name__ == "__main__":
    main()
