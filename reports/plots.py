"""The report's figures (matplotlib, Agg backend, PNG). Each function writes one file and returns it."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 80
MARKERS = {"image_auroc": "o", "pixel_auroc": "s", "pro": "^"}  # any other metric: "D"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _colours(names) -> dict:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(dict.fromkeys(names))}


def expected_vs_measured(matched: pd.DataFrame, tolerance: float, path: Path) -> Path:
    """Measured against the paper's value (points), one dot per method x class, the diagonal and
    the tolerance band; marker by metric, colour by method."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    colours = _colours(matched["variant"])
    for (variant, metric), g in matched.groupby(["variant", "metric"], sort=True):
        ax.scatter(g["expected"] * 100, g["mean"] * 100, color=colours[variant], marker=MARKERS.get(metric, "D"),
                   s=np.where(g["is_mean"] | g["is_group"], 70, 30), label=f"{variant} · {metric}", edgecolor="k",
                   linewidth=0.4)
    values = np.concatenate([matched["expected"].to_numpy(float), matched["mean"].to_numpy(float)]) * 100
    low, high = np.nanmin(values) - 2, min(100.5, np.nanmax(values) + 2)
    line = np.array([low, high])
    ax.plot(line, line, color="0.3", linewidth=1)
    ax.fill_between(line, line - tolerance, line + tolerance, color="0.85", label=f"±{tolerance:g} points")
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="paper (points)", ylabel="measured (points)",
           title="Measured vs paper (large dots: means, OOD group means)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def class_bars(board: pd.DataFrame, title: str, path: Path) -> Path:
    """One board's values per class (mean ± std over seeds), one bar per method; paper values as
    black ticks."""
    columns = list(dict.fromkeys(board["column"]))
    variants = list(dict.fromkeys(board["variant"]))
    colours = _colours(variants)
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(columns) * max(1, len(variants)) ** 0.5 + 2), 3.6))
    x = np.arange(len(columns))
    for i, variant in enumerate(variants):
        v = board[board["variant"] == variant].set_index("column").reindex(columns)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, v["mean"] * 100, width, yerr=np.nan_to_num(v["std"].to_numpy(float) * 100),
               color=colours[variant], label=variant, capsize=2)
        has = v["expected"].notna().to_numpy()
        ax.scatter(pos[has], v["expected"].to_numpy(float)[has] * 100, marker="_", color="k", s=120, zorder=3)
    finite = board["mean"].dropna()
    floor = max(0.0, min(finite.min() * 100 - 5, 50)) if len(finite) else 0.0
    ax.set_ylim(floor, 101)
    ax.set_xticks(x, columns, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("points")
    ax.set_title(title + "   (— paper)", fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(variants)), loc="lower left")
    return _save(fig, path)


def accuracy_vs_cost(cost: pd.DataFrame, title: str, path: Path) -> Path:
    """Accuracy against mean seconds per cell (log), the Pareto front drawn through its points."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    data = cost.dropna(subset=["total_s", "accuracy"])
    colours = _colours(data["variant"])
    for r in data.to_dict("records"):
        ax.scatter(r["total_s"], r["accuracy"] * 100, color=colours[r["variant"]], s=50,
                   edgecolor="k" if r["pareto"] else "none", linewidth=1.2, zorder=3)
        ax.annotate(r["variant"], (r["total_s"], r["accuracy"] * 100), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    front = data[data["pareto"]].sort_values("total_s")
    ax.step(front["total_s"], front["accuracy"] * 100, where="post", color="crimson", linewidth=1,
            label="Pareto front")
    if len(data) and (data["total_s"] > 0).all():
        ax.set_xscale("log")
    metric = data["accuracy_metric"].iloc[0] if len(data) else ""
    ax.set(xlabel="seconds per cell (mean)", ylabel=f"{metric} (points)", title=title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def decode_samples(blob: bytes) -> dict[str, np.ndarray]:
    """A row's ``sample_maps`` blob (np.savez_compressed: images, maps, labels, optional masks)."""
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _tiles(samples: dict) -> list[np.ndarray]:
    """Per sample: the image (RGB floats) with its mask outlined in green, then its map coloured
    on the row's shared scale."""
    maps = samples["maps"].astype(np.float32)
    low, high = float(np.nanmin(maps)), float(np.nanmax(maps))
    colour = plt.get_cmap("jet")
    tiles = []
    for j in range(len(samples["labels"])):
        image = samples["images"][j].astype(np.float32) / 255.0
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if "masks" in samples:
            image = image.copy()
            image[_outline(samples["masks"][j].astype(bool))] = (0.0, 1.0, 0.0)
        tiles += [image, colour((maps[j] - low) / (high - low if high > low else 1.0))[..., :3]]
    return tiles


def gallery(items: list[tuple[str, dict]], path: Path, gap: int = 4, label_gap: int = 12) -> Path:
    """Rows of (title, samples), drawn as one mosaic: image with mask outline, then anomaly map."""
    rows = [(title, _tiles(samples), samples["labels"]) for title, samples in items]
    side = rows[0][1][0].shape[0]
    n_cols = max(len(tiles) for _, tiles, _ in rows)
    pitch = side + label_gap
    mosaic = np.ones((len(rows) * pitch, n_cols * (side + gap), 3), np.float32)
    for i, (_, tiles, _) in enumerate(rows):
        for j, tile in enumerate(tiles):
            y, x = i * pitch + label_gap, j * (side + gap)
            mosaic[y:y + tile.shape[0], x:x + tile.shape[1]] = tile[:side, :side]
    fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 45 + 2.5, mosaic.shape[0] / 45 + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for i, (title, _, labels) in enumerate(rows):
        ax.text(-6, i * pitch + label_gap + side / 2, title, ha="right", va="center", fontsize=7)
        for j, label in enumerate(labels):
            ax.text(2 * j * (side + gap) + side / 2, i * pitch + label_gap - 2,
                    "anomalous" if label == 1 else "normal", ha="center", va="bottom", fontsize=6)
    ax.set_title("Test images (mask outlined in green) and their anomaly maps (shared scale per row)",
                 fontsize=8)
    return _save(fig, path)
