"""The non-finite guard: optimizer steps whose gradients hold a NaN or an infinity are skipped on the device, counted,
and reported at the logging steps; gradient clipping reuses the guard's norm.

:class:`NonFiniteGuard` is the LightningModule base that :class:`~ddpm_lightning.lit_module.DiffusionModule` builds on:
it owns the hooks around the optimizer step (``on_before_optimizer_step``, ``configure_gradient_clipping``) and the
count kept in checkpoints (``nonfinite_skips``). A subclass sets ``self._loss`` (the detached training loss) in its
``training_step`` and has a ``nonfinite_loss`` hyper-parameter (``"stop"`` or ``"skip"``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ddpm_lightning import compat

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "NonFiniteSteps", "is_check_step"]


class NonFiniteLossError(ValueError):
    """The training loss (and so its gradients) became NaN or infinite."""


def is_check_step(trainer: L.Trainer, step: int | None = None) -> bool:
    """Whether host-side checks may read device values (a host-device sync) once ``step`` optimizer steps are done.

    These are the logging steps (every ``trainer.log_every_n_steps``, or 50 when logging is off), where the logger
    reads its metrics anyway, so that the steps in between run without a synchronisation. ``step`` defaults to
    ``trainer.global_step``, the steps done so far.
    """
    every = trainer.log_every_n_steps or 50
    return (trainer.global_step if step is None else step) % every == 0


class NonFiniteSteps:
    """Optimizer steps whose gradients hold a NaN or an infinity, counted on the device.

    :meth:`update` gives the flag that fused Adam reads as ``found_inf``: when it is 1 the update is skipped on the
    device (weights and moments untouched), so no step has to wait for the host to look at the loss. Under DDP the
    check runs on the all-reduced gradients, which are the same on every process, so all of them agree without a
    collective of their own. :meth:`read` is the only host-device synchronisation.
    """

    def __init__(self, count: int = 0, device: torch.device | str = "cpu") -> None:
        self.count = torch.tensor(count, dtype=torch.long, device=device)
        self.first_step = torch.tensor(-1, dtype=torch.long, device=device)
        self.first_loss = torch.tensor(float("nan"), device=device)

    def update(self, grads: list[torch.Tensor], loss: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the step; return the gradients' total 2-norm and the float ``found_inf`` flag (1.0: skip)."""
        grad_norm = torch.nn.utils.get_total_norm(grads)
        found = ~torch.isfinite(grad_norm)
        first = found & (self.first_step < 0)
        self.first_step.masked_fill_(first, step)
        self.first_loss = torch.where(first, loss.detach().float(), self.first_loss)
        self.count += found
        return grad_norm, found.float()

    def read(self) -> tuple[int, int, float]:
        """(count, step of the first, that step's loss on this process): synchronises with the device."""
        return int(self.count), int(self.first_step), float(self.first_loss)


class NonFiniteGuard(L.LightningModule):
    """A LightningModule whose optimizer steps with non-finite gradients are skipped on the device, without a sync.

    ``hparams.nonfinite_loss``: ``"stop"`` ends the run at the next logging step with :class:`NonFiniteLossError`
    naming the first such step; ``"skip"`` warns and carries on.
    """

    def __init__(self) -> None:
        super().__init__()
        self._nonfinite = NonFiniteSteps()
        self._loss: torch.Tensor | None = None  # the detached training loss of the step, set by training_step
        self._grad_norm: torch.Tensor | None = None
        self._skips_reported = 0
        self.last_loss: float | None = None  # the training loss as last read on the host (logging steps)

    @property
    def nonfinite_skips(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far (reads a device counter: a sync)."""
        return int(self._nonfinite.count)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._nonfinite = NonFiniteSteps(checkpoint.get("nonfinite_skips", 0))

    def on_fit_start(self) -> None:
        self._skips_reported = self.nonfinite_skips
        self._nonfinite = NonFiniteSteps(self._skips_reported, self.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self._trainable() if p.grad is not None]
        grad_norm, found_inf = self._nonfinite.update(grads, self._loss, self.global_step)
        self._grad_norm = grad_norm
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # fused optimizers read found_inf after the closure: 1.0 leaves weights and moments as they were
            if not compat.set_found_inf(optimizer, found_inf) and found_inf.item():
                # any other optimizer (a host sync): without gradients it updates nothing
                for p in self._trainable():
                    p.grad = None
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        # float16 loss scaling skips the steps with non-finite gradients itself (they may still be scaled here, so no
        # grad_norm): counted all the same
        self.log("train/nonfinite_skips", self._nonfinite.count.float(), on_step=True, on_epoch=False)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients (``trainer.gradient_clip_val``), by their total norm unless the algorithm is "value".

        Done here rather than by Lightning's precision plugin, which refuses to clip for fused Adam under mixed
        precision. The norm is the one the non-finite guard has just computed: no second pass over the gradients.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)  # fused Adam would unscale inside its step, after the clipping
        parameters = [p for p in self._trainable() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            return
        grad_norm = self._grad_norm if scaler is None else torch.nn.utils.get_total_norm([p.grad for p in parameters])
        torch.nn.utils.clip_grads_with_norm_(parameters, gradient_clip_val, grad_norm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for optimizer in self.trainer.optimizers:
            compat.clear_found_inf(optimizer)
        if is_check_step(self.trainer) or self.global_step == 1:
            self.last_loss = float(self._loss)
            self._check_nonfinite()

    def on_train_end(self) -> None:
        self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Stop naming the first step whose gradients were not finite (``"stop"``), or warn (``"skip"``): a sync."""
        count, step, loss = self._nonfinite.read()
        if count == self._skips_reported:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            self._skips_reported = count  # float16 loss scaling expects skipped steps while it calibrates its scale
            return
        if self.hparams.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"the training loss is {loss} at step {step} and its gradients are not finite: that optimizer step "
                f"was skipped, {count} in all up to step {self.global_step}; check the data and the learning rate, "
                "or set model.nonfinite_loss=skip"
            )
        plural = "s" if count > 1 else ""
        rank_zero_warn(
            f"{count} optimizer step{plural} skipped for non-finite gradients so far, the first at step {step}"
        )
        self._skips_reported = count
