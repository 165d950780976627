"""Figures: layer × head heatmaps and KL-vs-ratio curves (matplotlib, written to PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402


def heatmap(values, title: str, colorbar_label: str, path: str | Path, log: bool = True) -> Path:
    """Save a layers × KV-heads heatmap of ``values [L][H]`` (log colour scale by default)."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    L, H = data.shape
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * H, 1.5 + 0.22 * L))
    norm = (
        LogNorm(vmin=max(data[data > 0].min(), 1e-12), vmax=data.max()) if log and (data > 0).any() else None
    )
    im = ax.imshow(data, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def kl_vs_ratio(series: dict[str, dict[float, float]], title: str, path: str | Path,
                xlabel: str = "fraction of KV entries kept", logx: bool = False) -> Path:  # fmt: skip
    """Save KL (log axis) against the kept ratio (or another ``xlabel``), one line per method:
    ``series[name][x] = kl``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out KL (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
