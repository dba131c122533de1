"""Fine-tuning losses on the network's log-depth output, (B, 1, H, W).

``valid`` marks pixels with a sensor return inside [min_depth, max_depth]; only they count,
except in ``mse``, which reproduces the tutorial's unmasked MSE in metres on purpose (invalid
pixels are pulled towards 0 m) so the two can be compared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# BTS's variance weight: 1.0 would be fully scale-invariant; 0.85 keeps some absolute scale.
SILOG_LAMBDA = 0.85
SILOG_SCALE = 10.0

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _log_error(log_pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """g = ln p - ln d on valid pixels only, flattened. Invalid depths (0) never reach the log."""
    safe_depth = torch.where(valid, depth, torch.ones_like(depth))
    return (log_pred - torch.log(safe_depth))[valid]


def silog_loss(log_pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    g = _log_error(log_pred, depth, valid)
    variance = g.pow(2).mean() - SILOG_LAMBDA * g.mean().pow(2)
    return SILOG_SCALE * variance.clamp_min(1e-8).sqrt()


def l1_log_loss(log_pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _log_error(log_pred, depth, valid).abs().mean()


def tutorial_mse_loss(
    log_pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    del valid  # the tutorial ignores the mask: that is what this loss reproduces
    return F.mse_loss(log_pred.exp(), depth)


LOSSES: dict[str, LossFn] = {"silog": silog_loss, "l1_log": l1_log_loss, "mse": tutorial_mse_loss}
MASKED = {"silog": True, "l1_log": True, "mse": False}


def depth_loss(
    name: str, log_pred: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor | None:
    """The named loss, or None when a masked loss has no valid pixel in the batch."""
    if MASKED[name] and not bool(valid.any()):
        return None
    return LOSSES[name](log_pred, depth, valid)
