"""The class labels of a class-conditional model (classifier-free guidance, Ho & Salimans 2021): read from a batch,
dropped to the null class for training, and bound to the network.

Labels are 0..num_classes-1, and ``num_classes`` is the null class (the unconditional model). An unconditional model
(``num_classes`` None) takes no labels, so that its network need not accept ``y``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ddpm_lightning.data.base import labels_of

__all__ = ["batch_labels", "bind_labels", "drop_labels", "label_kwargs"]


def batch_labels(batch: Any, num_classes: int) -> torch.Tensor:
    """The class labels (B,) of an (image, label) batch, or of a mapping batch (not range-checked here: that would
    read them on the host at every step; the class embedding refuses labels out of range)."""
    labels = labels_of(batch)
    if labels is None:
        raise ValueError(
            f"a class-conditional model (num_classes={num_classes}) trains on (image, label) batches, but the data "
            "yield bare images: use a data set with labels, or set model.num_classes=null"
        )
    return labels


def drop_labels(y: torch.Tensor, num_classes: int, p_uncond: float) -> torch.Tensor:
    """Label dropout: each label replaced by the null class (``num_classes``) with probability ``p_uncond`` (Ho &
    Salimans 2021, Algorithm 1), so that one network learns the conditional and the unconditional model."""
    if p_uncond > 0:
        drop = torch.rand(y.shape, device=y.device) < p_uncond
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    return y


def label_kwargs(num_classes: int | None, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"y": y}`` for a conditional model (y required), ``{}`` for an unconditional one (y refused)."""
    if num_classes is None:
        if y is not None:
            raise ValueError("this model is unconditional (num_classes=None): it takes no class labels")
        return {}
    if y is None:
        raise ValueError(f"this model is class-conditional (num_classes={num_classes}): give class labels y")
    return {"y": y}


def bind_labels(net: nn.Module, num_classes: int | None, y: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """``net`` as the diffusion's ``model(x_t, t)``, with the labels ``y`` bound for a conditional model."""
    return functools.partial(net, **label_kwargs(num_classes, y)) if num_classes is not None else net
