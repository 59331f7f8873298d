"""The learning-rate schedule: a linear warm-up, then constant (the paper), a linear or cosine decay to a floor,
warm-up-stable-decay, or EDM2's inverse square root; one frozen setting, validated once, whose factor is a pure
function of the step. :func:`configure_adam` builds a module's optimizer and schedule from it, :func:`apply_settings`
puts a resumed run's settings into them.

Because the factor depends only on (step, warm-up, decay length), a resumed run recomputes it from the restored step:
it continues where it stopped, and a resume that changes the setting (or the run's length) follows the new formula
from that step on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

import torch
from torch import nn

__all__ = ["DECAYING", "LR_SCHEDULES", "LRSchedule", "LRScheduleName", "apply_settings", "configure_adam"]

LRScheduleName = Literal["constant", "linear", "cosine", "wsd", "inverse_sqrt"]
LR_SCHEDULES: tuple[str, ...] = get_args(LRScheduleName)
#: the schedules that decay, and so need the run's length
DECAYING = ("linear", "cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The learning rate after its linear warm-up, as a factor of ``lr``.

    With ``s`` the optimizer steps done, ``W`` the warm-up steps, ``N`` the decay length and ``r`` ``min_lr_ratio``:
    warm-up ``min((s + 1) / W, 1)`` for ``s < W`` (Ho et al.'s code), then

    - ``constant``: 1 (the paper);
    - ``linear``: ``1 - (1 - r) p`` with ``p = (s - W) / (N - W)`` clipped to [0, 1];
    - ``cosine``: ``r + (1 - r) (1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017, without restarts);
    - ``wsd``: warm-up, stable at 1, then linear to ``r`` over the last ``decay_fraction`` of the N steps (Hu et al.
      2024, MiniCPM): ``1 - (1 - r) q``, ``q = (s - S) / (N - S)`` clipped, ``S = N - round(decay_fraction N)``;
    - ``inverse_sqrt``: ``1 / sqrt(max(s / ref_steps, 1))`` (EDM2, Karras et al. 2024, Eq. 20): constant until the
      reference step, then decaying as the inverse square root of the steps; it needs no run length.

    Args:
        name: the schedule, one of :data:`LR_SCHEDULES`.
        min_lr_ratio: the floor r of the decaying schedules, as a fraction of ``lr`` in [0, 1].
        decay_fraction: ``wsd``'s share of the run spent decaying, in (0, 1].
        total_steps: the decay length N in optimizer steps; None: the run's ``trainer.max_steps`` (a decaying schedule
            refuses a run without one, e.g. one bounded by ``max_time`` only, unless a ``TrainingBudget`` fixes it).
        ref_steps: ``inverse_sqrt``'s reference step t_ref, >= 1.

    In YAML: ``lr_schedule: {name: wsd, decay_fraction: 0.3}`` or a bare name, ``lr_schedule: cosine``.
    """

    name: LRScheduleName = "constant"
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2
    total_steps: int | None = None
    ref_steps: int = 1000

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.name!r}; allowed: {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"lr_schedule.min_lr_ratio must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"lr_schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1
        ):
            raise ValueError(f"lr_schedule.total_steps must be a positive integer or null, got {self.total_steps!r}")
        if isinstance(self.ref_steps, bool) or not isinstance(self.ref_steps, int) or self.ref_steps < 1:
            raise ValueError(f"lr_schedule.ref_steps must be a positive integer, got {self.ref_steps!r}")

    @classmethod
    def parse(cls, value: LRSchedule | Mapping[str, Any] | str | None) -> LRSchedule:
        """A schedule from a schedule, a mapping (YAML), a bare name or None (the paper's constant)."""
        if isinstance(value, LRSchedule):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        if isinstance(value, str):
            return cls(name=value)  # type: ignore[arg-type]
        if value is None:
            return cls()
        raise ValueError(f"lr_schedule must be a name ({', '.join(LR_SCHEDULES)}) or a mapping, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for hyper-parameters."""
        return dataclasses.asdict(self)

    def decay_steps(self, max_steps: int | None) -> int | None:
        """The decay length N: ``total_steps``, else ``max_steps`` (the run's, -1 or None: none); ValueError when a
        decaying schedule has neither."""
        if self.total_steps is not None:
            return self.total_steps
        if max_steps is not None and max_steps > 0:
            return max_steps
        if self.name in DECAYING:
            raise ValueError(
                f"lr_schedule {self.name!r} decays over the run's length, but the run has no trainer.max_steps "
                f"(got {max_steps}; a run bounded by max_time or epochs only): set trainer.max_steps or "
                "model.lr_schedule.total_steps"
            )
        return None

    def factor(self, step: int, warmup_steps: int, total_steps: int | None) -> float:
        """The learning rate of optimizer step ``step`` (0-based: the steps done) as a factor of ``lr``."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "inverse_sqrt":
            return 1.0 / math.sqrt(max(step / self.ref_steps, 1.0))
        assert total_steps is not None, "decay_steps() gives a decaying schedule its length"
        r = self.min_lr_ratio
        if self.name == "wsd":
            start = total_steps - round(self.decay_fraction * total_steps)
            q = min(max((step - start) / max(total_steps - start, 1), 0.0), 1.0)
            return 1.0 - (1.0 - r) * q
        p = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
        if self.name == "linear":
            return 1.0 - (1.0 - r) * p
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))

    def step_function(self, warmup_steps: int, trainer: Any = None) -> Callable[[int], float]:
        """The factor as a function of the step for ``LambdaLR``, over the run of ``trainer`` (None: no run length):
        its ``max_steps``, or the length a step budget among its callbacks (``TrainingBudget``: ``sets_max_steps``)
        fixes once it has measured the run's rate (the lr stays at 1 after the warm-up until then)."""
        callbacks = getattr(trainer, "callbacks", None) or []
        budget = next((c for c in callbacks if getattr(c, "sets_max_steps", False)), None)
        if budget is None:
            total = self.decay_steps(trainer.max_steps if trainer is not None else None)
            return functools.partial(self.factor, warmup_steps=warmup_steps, total_steps=total)
        return functools.partial(self._budgeted_factor, warmup_steps, budget)

    def _budgeted_factor(self, warmup_steps: int, budget: Any, step: int) -> float:
        if budget.max_steps is None:
            waiting = step >= warmup_steps and self.name != "inverse_sqrt"
            return 1.0 if waiting else self.factor(step, warmup_steps, None)
        return self.factor(step, warmup_steps, self.decay_steps(budget.max_steps))


def configure_adam(
    parameters: Iterable[nn.Parameter],
    net: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    warmup_steps: int,
    schedule: LRSchedule,
    trainer: Any = None,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: fused Adam over the trainable ``parameters``, and ``schedule``
    after ``warmup_steps`` as a ``LambdaLR`` stepped every optimizer step over the run of ``trainer``. A network with
    ``normalize_weights_`` (the magnitude-preserving :class:`~ddpm_lightning.models.MPUNet`) has it called after every
    step: EDM2's forced weight normalisation, before the weight average reads the weights."""
    trainable = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)
    # a function of the step alone, rebuilt on every fit: a resumed run continues from its restored step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.step_function(warmup_steps, trainer))
    normalize = getattr(net, "normalize_weights_", None)
    if callable(normalize):
        optimizer.register_step_post_hook(lambda *_: normalize())
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def apply_settings(trainer: Any, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """Put ``lr``, ``betas`` and ``weight_decay`` into the trainer's optimizers and learning-rate schedules, after
    Lightning has restored them from a checkpoint with the values it was trained with (a resumed run may change them:
    ``ddpm_lightning.cli.resume``). The warm-up and decay follow the schedule's function, which
    :func:`configure_adam` rebuilds on every fit (never restored)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group.update(initial_lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            groups = scheduler.optimizer.param_groups
            for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
                group["lr"] = lr * factor(scheduler.last_epoch)
