"""Pictures for evaluate: the prediction grid and the per-metric comparison chart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from depthpipe.config import DepthConfig
from depthpipe.metrics import HIGHER_IS_BETTER, METRIC_NAMES

DEPTH_CMAP = "magma_r"  # near = bright, far = dark
ERROR_CMAP = "inferno"
INVALID = "black"


class GridImage(Protocol):
    name: str
    image: np.ndarray
    depth: np.ndarray
    valid: np.ndarray
    predictions: dict[str, np.ndarray]


def _cmap(name: str) -> matplotlib.colors.Colormap:
    cmap = plt.get_cmap(name).copy()
    cmap.set_bad(INVALID)  # masked (invalid) pixels are drawn black
    return cmap


def depth_norm(images: Sequence[GridImage], depth: DepthConfig) -> LogNorm:
    """One log-scaled colour range for every depth panel: the valid ground truth's 1-99%."""
    values = np.concatenate([im.depth[im.valid] for im in images if im.valid.any()] or [[1.0]])
    lo = max(float(np.percentile(values, 1)), depth.min_depth)
    hi = min(float(np.percentile(values, 99)), depth.max_depth)
    return LogNorm(vmin=lo, vmax=max(hi, lo * 1.01))


def prediction_grid(
    images: Sequence[GridImage], labels: dict[str, str], depth: DepthConfig
) -> Figure:
    """Rows: test images. Columns: RGB, ground truth, each model's prediction, abs-rel error of
    the first model. Depth shares one log colour scale; invalid ground truth is black."""
    models = list(labels)
    columns = ["RGB", "ground truth", *(labels[m] for m in models), f"abs rel error ({models[0]})"]
    fig, axes = plt.subplots(
        len(images), len(columns), squeeze=False, figsize=(2.6 * len(columns), 2.1 * len(images))
    )
    norm = depth_norm(images, depth)
    depth_cmap, error_cmap = _cmap(DEPTH_CMAP), _cmap(ERROR_CMAP)
    for row, im in enumerate(images):
        error = np.abs(im.predictions[models[0]] - im.depth) / np.where(im.valid, im.depth, 1.0)
        panels = [
            (im.image, None, None),
            (np.ma.masked_where(~im.valid, im.depth), depth_cmap, norm),
            *((im.predictions[m], depth_cmap, norm) for m in models),
            (np.ma.masked_where(~im.valid, error), error_cmap, plt.Normalize(0.0, 1.0)),
        ]
        for col, (data, cmap, col_norm) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(data, cmap=cmap, norm=col_norm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        axes[row, 0].set_ylabel(im.name, fontsize=7)
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=depth_cmap),
        ax=axes[:, 1:-1],
        label="depth (m, log scale)",
        shrink=0.8,
    )
    fig.colorbar(
        plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=error_cmap),
        ax=axes[:, -1],
        label="|p - d| / d",
        shrink=0.8,
    )
    return fig


def comparison_chart(results: dict[str, dict[str, float]], labels: dict[str, str]) -> Figure:
    """One small bar chart per metric, the models side by side."""
    fig, axes = plt.subplots(1, len(METRIC_NAMES), figsize=(2.0 * len(METRIC_NAMES), 2.8))
    colours = ["tab:blue", "tab:grey", "tab:orange", "tab:green"]
    for ax, metric in zip(axes, METRIC_NAMES, strict=True):
        values = [results[m][metric] for m in labels]
        ax.bar(range(len(values)), values, color=colours[: len(values)])
        ax.set_xticks(
            range(len(values)), [labels[m] for m in labels], rotation=45, ha="right", fontsize=7
        )
        arrow = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
        ax.set_title(f"{metric}\n({arrow})", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
