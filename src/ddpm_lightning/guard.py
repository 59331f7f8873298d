"""The non-finite guard: optimizer steps whose gradients hold a NaN or an infinity are skipped on the device, counted,
and reported at the logging steps; gradient clipping reuses the guard's norm.

:class:`NonFiniteGuard` is an object a module holds (``DiffusionModule.guard``) and calls from its hooks around the
optimizer step (``on_before_optimizer_step``, ``configure_gradient_clipping``, ``on_train_batch_end``); the module
sets ``guard.loss`` (the detached training loss) in its ``training_step`` and keeps the count in checkpoints
(``nonfinite_skips``).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ddpm_lightning import choices, compat

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


class NonFiniteGuard:
    """The non-finite guard a LightningModule holds (composition, not a base class): optimizer steps with non-finite
    gradients are skipped on the device, without a sync; the module calls it from its hooks, passing itself.

    ``mode``: ``"stop"`` ends the run at the next logging step with :class:`NonFiniteLossError` naming the first such
    step; ``"skip"`` warns and carries on. The module sets :attr:`loss` (the detached training loss) in its
    ``training_step``.
    """

    def __init__(self, mode: str = "stop") -> None:
        if mode not in choices.NONFINITE_LOSSES:
            raise ValueError(f"unknown nonfinite_loss {mode!r}; allowed: {', '.join(choices.NONFINITE_LOSSES)}")
        self.mode = mode
        self.steps = NonFiniteSteps()
        self.loss: torch.Tensor | None = None  # the detached training loss of the step
        self.grad_norm: torch.Tensor | None = None
        self.reported = 0
        self.last_loss: float | None = None  # the training loss as last read on the host (logging steps)

    @property
    def skips(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far (reads a device counter: a sync)."""
        return int(self.steps.count)

    def load(self, skips: int) -> None:
        """Continue the count of a checkpoint."""
        self.steps = NonFiniteSteps(skips)

    def fit_start(self, module: L.LightningModule) -> None:
        self.reported = self.skips
        self.steps = NonFiniteSteps(self.reported, module.device)

    def before_optimizer_step(self, module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Check the gradients' norm; a non-finite one skips the step (``found_inf`` of fused Adam, else no grads)."""
        grads = [p.grad for p in _trainable(module) if p.grad is not None]
        grad_norm, found_inf = self.steps.update(grads, self.loss, module.global_step)
        self.grad_norm = grad_norm
        if getattr(module.trainer.precision_plugin, "scaler", None) is None:
            # fused optimizers read found_inf after the closure: 1.0 leaves weights and moments as they were
            if not compat.set_found_inf(optimizer, found_inf) and found_inf.item():
                # any other optimizer (a host sync): without gradients it updates nothing
                for p in _trainable(module):
                    p.grad = None
            module.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        # float16 loss scaling skips the steps with non-finite gradients itself (they may still be scaled here, so no
        # grad_norm): counted all the same
        module.log("train/nonfinite_skips", self.steps.count.float(), on_step=True, on_epoch=False)

    def clip_gradients(
        self,
        module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients (``trainer.gradient_clip_val``), by their total norm unless the algorithm is "value".

        Done here rather than by Lightning's precision plugin, which refuses to clip for fused Adam under mixed
        precision. The norm is the one the guard has just computed: no second pass over the gradients.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)  # fused Adam would unscale inside its step, after the clipping
        parameters = [p for p in _trainable(module) if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            return
        grad_norm = self.grad_norm if scaler is None else torch.nn.utils.get_total_norm([p.grad for p in parameters])
        torch.nn.utils.clip_grads_with_norm_(parameters, gradient_clip_val, grad_norm)

    def batch_end(self, module: L.LightningModule) -> None:
        """Clear the skip flags; on the logging steps read the loss and report new skips (a sync)."""
        for optimizer in module.trainer.optimizers:
            compat.clear_found_inf(optimizer)
        if is_check_step(module.trainer) or module.global_step == 1:
            self.last_loss = float(self.loss)
            self.check(module)

    def check(self, module: L.LightningModule) -> None:
        """Stop naming the first step whose gradients were not finite (``"stop"``), or warn (``"skip"``): a sync."""
        count, step, loss = self.steps.read()
        if count == self.reported:
            return
        if getattr(module.trainer.precision_plugin, "scaler", None) is not None:
            self.reported = count  # float16 loss scaling expects skipped steps while it calibrates its scale
            return
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"the training loss is {loss} at step {step} and its gradients are not finite: that optimizer step "
                f"was skipped, {count} in all up to step {module.global_step}; check the data and the learning rate, "
                "or set model.runtime.nonfinite_loss=skip"
            )
        plural = "s" if count > 1 else ""
        rank_zero_warn(
            f"{count} optimizer step{plural} skipped for non-finite gradients so far, the first at step {step}"
        )
        self.reported = count


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
