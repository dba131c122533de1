"""Standard monocular depth metrics for one image (Eigen et al. 2014; silog as in BTS, x100).

d = ground truth, p = prediction over valid pixels, g = ln p - ln d:
abs_rel = mean(|p - d| / d), sq_rel = mean((p - d)^2 / d), rmse = sqrt(mean((p - d)^2)),
rmse_log = sqrt(mean(g^2)), log10 = mean(|log10 p - log10 d|),
silog = 100 sqrt(mean(g^2) - mean(g)^2), delta_k = fraction with max(p/d, d/p) < 1.25^k.

Scale-aligned metrics (``*_aligned``) score the prediction times median(d / p) over the image's
valid pixels (the per-pixel ratio's median, the lower middle value for an even count; Monodepth2
scales by median(d) / median(p) instead, which agrees for a pure scale error), clipped to the
valid range afterwards: what is left is the
error of the depth map's structure, with the global scale error taken out. Read beside the
metric ones they tell a network that has the layout right at the wrong scale from one that has
the layout wrong.
"""

from __future__ import annotations

import math

import numpy as np
import torch

METRIC_NAMES = (
    "abs_rel",
    "sq_rel",
    "rmse",
    "rmse_log",
    "log10",
    "silog",
    "delta1",
    "delta2",
    "delta3",
)
ALIGNED_METRIC_NAMES = ("abs_rel_aligned", "delta1_aligned")
# For each metric: is a higher value better? (the deltas are accuracies, the rest errors)
HIGHER_IS_BETTER = {
    name: name.startswith("delta") for name in (*METRIC_NAMES, *ALIGNED_METRIC_NAMES)
}

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(array: ArrayLike) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.asarray(array, dtype=np.float64))
    return array.detach().to(device="cpu", dtype=torch.float64)


def sanitise_prediction(pred: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """Clip to the valid range; NaN becomes min_depth (a broken output scores as badly wrong,
    never as a NaN that would poison the average), +inf max_depth, -inf min_depth."""
    pred = torch.nan_to_num(pred, nan=min_depth, posinf=max_depth, neginf=min_depth)
    return pred.clamp(min_depth, max_depth)


def valid_pairs(
    pred: ArrayLike, gt: ArrayLike, valid: ArrayLike, min_depth: float, max_depth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, ground truth) over the valid pixels, float64, the prediction sanitised.

    Raises ValueError when no pixel is valid: such an image has no score (the caller decides
    whether to skip it), it must not become a 0 or a NaN in an average.
    """
    p, d = _as_float64(pred), _as_float64(gt)
    mask = _as_float64(valid) > 0 if not isinstance(valid, torch.Tensor) else valid.cpu().bool()
    if p.shape != d.shape or mask.shape != d.shape:
        raise ValueError(
            f"shapes differ: pred {tuple(p.shape)}, gt {tuple(d.shape)}, valid {tuple(mask.shape)}"
        )
    mask = mask & torch.isfinite(d) & (d > 0)
    if not bool(mask.any()):
        raise ValueError("no valid pixel")
    return sanitise_prediction(p[mask], min_depth, max_depth), d[mask]


def depth_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    valid: ArrayLike,
    min_depth: float = 0.6,
    max_depth: float = 350.0,
) -> dict[str, float]:
    """Metrics of one image over ``valid`` pixels (bool, same shape as ``gt``); ValueError when
    none is valid (``valid_pairs``)."""
    p, d = valid_pairs(pred, gt, valid, min_depth, max_depth)
    return _metrics_of_pairs(p, d)


def aligned_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    valid: ArrayLike,
    min_depth: float = 0.6,
    max_depth: float = 350.0,
) -> dict[str, float]:
    """``abs_rel_aligned`` and ``delta1_aligned`` of one image: the prediction multiplied by
    median(gt / pred) over the valid pixels, clipped to the valid range, then scored."""
    p, d = valid_pairs(pred, gt, valid, min_depth, max_depth)
    return _aligned_of_pairs(p, d, min_depth, max_depth)


def depth_and_aligned_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    valid: ArrayLike,
    min_depth: float = 0.6,
    max_depth: float = 350.0,
) -> dict[str, float]:
    """``depth_metrics`` and ``aligned_metrics`` of one image, its valid pixels gathered once
    (a full-resolution test image is scored per model)."""
    p, d = valid_pairs(pred, gt, valid, min_depth, max_depth)
    return {**_metrics_of_pairs(p, d), **_aligned_of_pairs(p, d, min_depth, max_depth)}


def _aligned_of_pairs(
    p: torch.Tensor, d: torch.Tensor, min_depth: float, max_depth: float
) -> dict[str, float]:
    scale = torch.median(d / p)
    scored = _metrics_of_pairs((p * scale).clamp(min_depth, max_depth), d)
    return {f"{name}_aligned": scored[name] for name in ("abs_rel", "delta1")}


def _metrics_of_pairs(p: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
    g = torch.log(p) - torch.log(d)
    ratio = torch.maximum(p / d, d / p)
    silog_var = (g.pow(2).mean() - g.mean().pow(2)).clamp_min(0.0)
    values = {
        "abs_rel": ((p - d).abs() / d).mean(),
        "sq_rel": ((p - d).pow(2) / d).mean(),
        "rmse": (p - d).pow(2).mean().sqrt(),
        "rmse_log": g.pow(2).mean().sqrt(),
        "log10": (torch.log10(p) - torch.log10(d)).abs().mean(),
        "silog": 100.0 * silog_var.sqrt(),
        "delta1": (ratio < 1.25).double().mean(),
        "delta2": (ratio < 1.25**2).double().mean(),
        "delta3": (ratio < 1.25**3).double().mean(),
    }
    return {name: float(value) for name, value in values.items()}


def average_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean over images of every metric they carry (the DIODE devkit's convention: every image
    weighs the same)."""
    if not per_image:
        raise ValueError("no image to average")
    names = per_image[0].keys()
    if any(m.keys() != names for m in per_image):
        raise ValueError("images carry different metrics: an average would mix them")
    return {name: math.fsum(m[name] for m in per_image) / len(per_image) for name in names}
