"""EMA of the weights through Lightning's own ``WeightAveraging``, behind the averaging interface
(:class:`~ddpm_lightning.averaging.WeightAverage`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging

from ddpm_lightning import compat
from ddpm_lightning.averaging import WeightAverage
from ddpm_lightning.posthoc import power_beta, sigma_rel_to_gamma

__all__ = ["EMA", "PowerEMA"]


class EMA(WeightAveraging, WeightAverage):
    """Exponential moving average of the weights (Ho et al.: decay 0.9999, updated after every optimizer step).

    In a config: ``trainer.callbacks: [{class_path: ddpm_lightning.callbacks.EMA, init_args: {decay: 0.9999}}]``; a
    ``ddpm fit`` without an averaging callback gets ``EMA(0.9999)`` (its ``default_callbacks``). It registers itself
    with the module (``DiffusionModule.use_average``): sampling and validation use the average (the rule of
    :mod:`ddpm_lightning.averaging`). Lightning keeps the average on the model's device, swaps it in for
    validation, writes it to the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``) and
    restores both on resume. So a checkpoint loaded with ``DiffusionModule.load_from_checkpoint`` holds the EMA
    weights.

    The update is one foreach lerp (:func:`~ddpm_lightning.compat.foreach_lerp_`) over the parameters, starting from
    the initial weights as in Ho et al.'s code (TensorFlow's ``ExponentialMovingAverage``), instead of
    ``AveragedModel``'s loop: that loop launches a few kernels per parameter and reads its step counter on the host
    twice per step (two host-device syncs).
    Buffers (schedule tables, fixed kernels) are constants and keep the values copied at the start. The callback
    holds no closure (unlike ``EMAWeightAveraging``), so ``ddp_spawn`` can send it to its processes.
    """

    def __init__(self, decay: float = 0.9999, update_starting_at_step: int | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        super().__init__()
        self.decay = decay
        self.update_starting_at_step = update_starting_at_step
        self._pairs: tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]] | None = None
        self._initial_net: dict[str, torch.Tensor] | None = None

    def start_from(self, net_weights: dict[str, torch.Tensor]) -> None:
        """Start the average of the network at ``net_weights`` (a state dict of ``pl_module.net``) instead of the
        module's weights: the EMA of a checkpoint that a new run starts from (``ddpm fit --init_from``)."""
        self._initial_net = net_weights

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        register = getattr(pl_module, "use_average", None)
        if register is not None:
            register(None)  # the averaged copy made below must not hold a reference to this callback
        # keep the average where training runs: the model may still be on the CPU when setup is called
        compat.set_ema_device(self, trainer.strategy.root_device)
        super().setup(trainer, pl_module, stage)
        if register is not None:
            register(self)
        self._pairs = None
        if self._initial_net is not None and stage == "fit":
            compat.averaged_model(self).module.net.load_state_dict(self._initial_net)
            self._initial_net = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """After every optimizer step (``step_idx``: its index) from ``update_starting_at_step`` on; never per epoch."""
        start = self.update_starting_at_step
        return step_idx is not None and (start is None or step_idx >= start)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > compat.ema_last_update_step(self) and self.should_update(step_idx=step - 1):
            self.update(pl_module)
            compat.set_ema_last_update_step(self, step)

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> None:
        """One EMA step: average = decay * average + (1 - decay) * weights, for every parameter at once.

        With ``update_starting_at_step`` the first update copies the weights: the average starts there.
        """
        model = compat.averaged_model(self)
        if self._pairs is None:
            self._pairs = (list(model.module.parameters()), list(pl_module.parameters()))
        average, current = self._pairs
        if self.update_starting_at_step is not None and compat.ema_last_update_step(self) == 0:
            compat.foreach_copy_(average, current)
        else:
            compat.foreach_lerp_(average, current, self.lerp_weight(pl_module))
        model.n_averaged += 1

    def lerp_weight(self, pl_module: L.LightningModule) -> float:
        """How far one update moves the average towards the weights: 1 - decay."""
        return 1.0 - self.decay

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning would copy the average into the model here, before ModelCheckpoint writes the final last.ckpt:
        # that checkpoint would then lose the raw weights and a resumed run would continue from the EMA. Keep the
        # raw weights; sampling reads the average through ``average_module()`` and checkpoints hold both.
        return

    def average_module(self) -> L.LightningModule | None:
        """The averaged copy of the LightningModule during fit, or None outside fit."""
        model = compat.averaged_model(self)
        return None if model is None else model.module

    @property
    def state_key(self) -> str:
        # one EMA per run: a stable key lets a checkpoint resume even if the decay changes
        return "EMA"


class PowerEMA(EMA):
    """The power-function EMA of EDM2 (Karras et al. 2024, Sec. 3.1) as the in-training average: after optimizer step
    t the average moves by 1 - beta_t with beta_t = (1 - 1/t)^(gamma + 1) (their Eq. 3), so that it weighs the
    weights of step tau in proportion to tau^gamma: its length grows with the run instead of being a fixed number of
    steps, and the start of the run is forgotten.

    Args:
        sigma_rel: the relative standard deviation of the averaging profile (EDM2 Eq. 2; 0.05 to 0.15 in their
            runs), from which gamma is solved; in (0, sqrt(1/12)).

    Everything else (checkpoints, resume, sampling with the average) is :class:`EMA`'s; ``decay`` is unused.
    ``ddpm posthoc-ema`` reconstructs other lengths after the run from :class:`PostHocEMA` snapshots instead.
    """

    def __init__(self, sigma_rel: float = 0.05) -> None:
        super().__init__(decay=0.0)
        self.sigma_rel = sigma_rel
        self.gamma = sigma_rel_to_gamma(sigma_rel)

    def lerp_weight(self, pl_module: L.LightningModule) -> float:
        """1 - beta_t of the power-function EMA, t the optimizer steps done."""
        return 1.0 - power_beta(max(pl_module.trainer.global_step, 1), self.gamma)
