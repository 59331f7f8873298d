"""The training settings of :class:`~ddpm_lightning.lit_module.DiffusionModule` other than the model: Adam's
(:class:`AdamConfig`), the learning-rate schedule (:class:`LRSchedule`) and how the steps run (:class:`RuntimeConfig`);
each a frozen setting, validated once, given in YAML as a mapping (or, for the schedule, a bare name).
:func:`configure_adam` builds a module's optimizer and schedule from them, :func:`apply_settings` puts a resumed run's
settings into them.

The schedule is a linear warm-up, then constant (the paper), a linear or cosine decay to a floor, warm-up-stable-decay,
or EDM2's inverse square root. Because its factor depends only on (step, warm-up, decay length), a resumed run
recomputes it from the restored step: it continues where it stopped, and a resume that changes the setting (or the
run's length) follows the new formula from that step on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch
from torch import nn

from ddpm_lightning import choices
from ddpm_lightning.settings import Setting

__all__ = [
    "DECAYING",
    "LR_SCHEDULES",
    "AdamConfig",
    "LRSchedule",
    "LRScheduleName",
    "RuntimeConfig",
    "apply_settings",
    "configure_adam",
]

LRScheduleName = Literal["constant", "linear", "cosine", "wsd", "inverse_sqrt"]
LR_SCHEDULES: tuple[str, ...] = get_args(LRScheduleName)
#: the schedules that decay, and so need the run's length
DECAYING = ("linear", "cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class AdamConfig(Setting):
    """Adam's settings other than the learning rate (``lr`` and ``lr_schedule`` set that).

    Args:
        betas: (beta1, beta2), the decay rates of the moment estimates (Kingma & Ba 2015); EDM2 uses (0.9, 0.99).
        weight_decay: L2 penalty added to the gradients (torch's Adam), >= 0.

    In YAML: ``optimizer: {betas: [0.9, 0.99], weight_decay: 0.0}``.
    """

    KEY = "optimizer"

    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        object.__setattr__(self, "betas", betas)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for hyper-parameters."""
        return {"betas": list(self.betas), "weight_decay": self.weight_decay}


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(Setting):
    """How the training steps run; none of these changes the function learned.

    Args:
        compile: ``torch.compile`` the network for training (the EMA copy used for sampling stays eager).
        channels_last: keep the network (and its EMA copy) in the channels-last memory format: 1.1x faster training
            on a CPU (``make bench``) and the layout tensor-core convolutions want on GPUs.
        matmul_precision: ``torch.set_float32_matmul_precision`` for the run (``"high"``: TF32); None keeps it.
        nonfinite_loss: a NaN/inf loss makes NaN/inf gradients, whose optimizer step is always skipped on the device
            (counted in ``train/nonfinite_skips``). ``"stop"`` then ends the run at the next logging step with an
            error naming the step; ``"skip"`` carries on. Checking on the device keeps the step free of host syncs.

    In YAML: ``runtime: {compile: true, matmul_precision: high}``.
    """

    KEY = "runtime"

    compile: bool = False
    channels_last: bool = True
    matmul_precision: Literal[choices.MATMUL_PRECISIONS] | None = None  # type: ignore[valid-type]
    nonfinite_loss: Literal[choices.NONFINITE_LOSSES] = "stop"  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        if self.matmul_precision is not None and self.matmul_precision not in choices.MATMUL_PRECISIONS:
            raise ValueError(
                f"unknown runtime.matmul_precision {self.matmul_precision!r}; allowed: "
                f"{', '.join(choices.MATMUL_PRECISIONS)} or null"
            )
        if self.nonfinite_loss not in choices.NONFINITE_LOSSES:
            allowed = ", ".join(choices.NONFINITE_LOSSES)
            raise ValueError(f"unknown runtime.nonfinite_loss {self.nonfinite_loss!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class LRSchedule(Setting):
    """The learning rate, a linear warm-up then a schedule, as a factor of ``lr``.

    With ``s`` the optimizer steps done, ``W`` the warm-up steps (``warmup_steps``), ``N`` the decay length and ``r``
    ``min_lr_ratio``: warm-up ``min((s + 1) / W, 1)`` for ``s < W`` (Ho et al.'s code), then

    - ``constant``: 1 (the paper);
    - ``linear``: ``1 - (1 - r) p`` with ``p = (s - W) / (N - W)`` clipped to [0, 1];
    - ``cosine``: ``r + (1 - r) (1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017, without restarts);
    - ``wsd``: warm-up, stable at 1, then linear to ``r`` over the last ``decay_fraction`` of the N steps (Hu et al.
      2024, MiniCPM): ``1 - (1 - r) q``, ``q = (s - S) / (N - S)`` clipped, ``S = N - round(decay_fraction N)``;
    - ``inverse_sqrt``: ``1 / sqrt(max(s / ref_steps, 1))`` (EDM2, Karras et al. 2024, Eq. 20): constant until the
      reference step, then decaying as the inverse square root of the steps; it needs no run length.

    Args:
        name: the schedule after the warm-up, one of :data:`LR_SCHEDULES`.
        warmup_steps: the optimizer steps of the linear warm-up from lr / W to lr (the paper: 5000), >= 0.
        min_lr_ratio: the floor r of the decaying schedules, as a fraction of ``lr`` in [0, 1].
        decay_fraction: ``wsd``'s share of the run spent decaying, in (0, 1].
        total_steps: the decay length N in optimizer steps; None: the run's ``trainer.max_steps`` (a decaying schedule
            refuses a run without one, e.g. one bounded by ``max_time`` only, unless a ``TrainingBudget`` fixes it).
        ref_steps: ``inverse_sqrt``'s reference step t_ref, >= 1.

    In YAML: ``lr_schedule: {name: wsd, warmup_steps: 1000, decay_fraction: 0.3}`` or a bare name,
    ``lr_schedule: cosine``.
    """

    KEY, NAMES = "lr_schedule", LR_SCHEDULES

    name: LRScheduleName = "constant"
    warmup_steps: int = 5000
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2
    total_steps: int | None = None
    ref_steps: int = 1000

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.name!r}; allowed: {', '.join(LR_SCHEDULES)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"lr_schedule.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
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

    def factor(self, step: int, total_steps: int | None) -> float:
        """The learning rate of optimizer step ``step`` (0-based: the steps done) as a factor of ``lr``."""
        warmup_steps = self.warmup_steps
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

    def step_function(self, trainer: Any = None) -> Callable[[int], float]:
        """The factor as a function of the step for ``LambdaLR``, over the run of ``trainer`` (None: no run length):
        its ``max_steps``, or the length a step budget among its callbacks (``TrainingBudget``: ``sets_max_steps``)
        fixes once it has measured the run's rate (the lr stays at 1 after the warm-up until then)."""
        callbacks = getattr(trainer, "callbacks", None) or []
        budget = next((c for c in callbacks if getattr(c, "sets_max_steps", False)), None)
        if budget is None:
            total = self.decay_steps(trainer.max_steps if trainer is not None else None)
            return functools.partial(self.factor, total_steps=total)
        return functools.partial(self._budgeted_factor, budget)

    def _budgeted_factor(self, budget: Any, step: int) -> float:
        if budget.max_steps is None:
            waiting = step >= self.warmup_steps and self.name != "inverse_sqrt"
            return 1.0 if waiting else self.factor(step, None)
        return self.factor(step, self.decay_steps(budget.max_steps))


def configure_adam(
    parameters: Iterable[nn.Parameter],
    net: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    schedule: LRSchedule,
    trainer: Any = None,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: fused Adam over the trainable ``parameters``, and ``schedule``
    (its warm-up first) as a ``LambdaLR`` stepped every optimizer step over the run of ``trainer``. A network with
    ``normalize_weights_`` (the magnitude-preserving :class:`~ddpm_lightning.models.MPUNet`) has it called after every
    step: EDM2's forced weight normalisation, before the weight average reads the weights."""
    trainable = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)
    # a function of the step alone, rebuilt on every fit: a resumed run continues from its restored step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.step_function(trainer))
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
