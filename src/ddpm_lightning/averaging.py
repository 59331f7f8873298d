"""The averaging interface: how a weight-averaging callback hands its average of the network to the module.

One rule for which weights each use reads, whatever the averaging scheme (:class:`~ddpm_lightning.callbacks.EMA`,
:class:`~ddpm_lightning.callbacks.PostHocEMA`):

- **training** updates the raw weights; the average follows them after every optimizer step;
- **sampling** (``DiffusionModule.sample``, the sampling, FID and bits/dim callbacks) and **validation** use the
  average: ``DiffusionModule.sampling_module()`` asks the registered :class:`WeightAverage` for
  :meth:`~WeightAverage.average_module`, and the raw module when there is none;
- **checkpoints** hold the average in ``state_dict`` (the averaged network and the module's ``diffusion.*`` buffers),
  so that ``DiffusionModule.load_from_checkpoint`` and every command read the averaged weights, and the raw weights in
  ``current_model_state``, from which a resumed run continues training (the layout of Lightning's
  ``WeightAveraging``); the callback's own state (its step, its profiles) is in its callback state.

The average covers the network only: the diffusion buffers are constants. A callback registers itself in its
``setup`` with ``DiffusionModule.use_average(self)``; one average per run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning as L
import torch

__all__ = ["WeightAverage"]


class WeightAverage(ABC):
    """A callback that keeps an average of the network's weights for sampling, validation and checkpoints."""

    @abstractmethod
    def average_module(self) -> L.LightningModule | None:
        """The module holding the averaged network that sampling uses, or None before the average exists."""

    @abstractmethod
    def start_from(self, net_weights: dict[str, torch.Tensor]) -> None:
        """Start the average of the network at ``net_weights`` (a state dict of ``pl_module.net``), for a new run
        that starts from a checkpoint's weights and their average (``ddpm fit --init_from``)."""
