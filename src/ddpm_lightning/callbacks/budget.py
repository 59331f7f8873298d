"""Equal training time for the candidates of an ablation, measured inside each candidate's own fit.

:class:`TrainingBudget` times the candidate's optimizer steps (from ``on_train_batch_start`` to
``on_train_batch_end``: forward, backward, optimizer step and the per-step callbacks; validation, sampling and data
loading outside them are not charged) after ``warmup_steps`` steps, over ``measure_steps`` steps, and then sets the
run's step count to the steps this candidate makes in ``seconds`` at the measured rate. The run then ends at a fixed
step like any other (its checkpoint, samples and scores as usual), and ``budget.json`` in the run folder records the
rate and the steps. Because the run's length is then known, decaying learning-rate schedules (``DiffusionModule``
reads the fixed step count) and ``GuideCheckpoint(at_fraction=...)`` work with a wall-clock budget (``make demo
DEMO_TIME=...``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L

from ddpm_lightning.io import write_json

__all__ = ["BUDGET_FILE", "TrainingBudget"]

BUDGET_FILE = "budget.json"


class TrainingBudget(L.Callback):
    """End the fit after the steps that ``seconds`` of this candidate's own steady-state training steps take.

    Args:
        seconds: the training time budget, > 0: seconds, or a ``"DD:HH:MM:SS"`` duration (``trainer.max_time``'s
            format).
        warmup_steps: steps run before timing (first-call allocations, kernels chosen, compilation), >= 0.
        measure_steps: steps timed for the rate, >= 1. A budget spent before the measurement ends stops the run at
            the step where it is spent.
    """

    #: the step count this callback fixes (``max_steps``) is the run's length for the learning-rate schedule
    sets_max_steps = True

    def __init__(self, seconds: float | str, warmup_steps: int = 5, measure_steps: int = 20) -> None:
        if isinstance(seconds, str):
            seconds = _duration_seconds(seconds)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
            raise ValueError(f"the training budget must be a positive number of seconds, got {seconds!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if measure_steps < 1:
            raise ValueError(f"measure_steps must be >= 1, got {measure_steps}")
        self.seconds = float(seconds)
        self.warmup_steps = warmup_steps
        self.measure_steps = measure_steps
        self._start = 0.0
        self._spent = 0.0  # seconds of timed steps so far, warm-up included
        self._measured = 0.0  # seconds of the measured steps
        self.steps_per_second: float | None = None
        self.max_steps: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self.max_steps is None:
            # a resumed run: its budget counts from the step it restarts at
            self.warmup_steps += trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.max_steps is not None:
            return
        elapsed = time.perf_counter() - self._start
        self._spent += elapsed
        step = trainer.global_step
        if step > self.warmup_steps:
            self._measured += elapsed
        # rank 0's clock decides for every process, so that all of them stop at the same step
        if trainer.strategy.broadcast(self._spent >= self.seconds, 0):  # spent before the rate is known: stop here
            rate = (step - self.warmup_steps) / self._measured if self._measured else None
            self._set(trainer, step, trainer.strategy.broadcast(rate, 0))
        elif step >= self.warmup_steps + self.measure_steps:
            rate = trainer.strategy.broadcast(self.measure_steps / self._measured, 0)
            self._set(trainer, max(step, round(self.seconds * rate)), rate)

    def _set(self, trainer: L.Trainer, max_steps: int, rate: float | None) -> None:
        self.max_steps, self.steps_per_second = max_steps, rate
        trainer.fit_loop.epoch_loop.max_steps = max_steps
        if trainer.global_step >= max_steps:
            trainer.should_stop = True
        if trainer.is_global_zero:
            info = {
                "budget_seconds": self.seconds,
                "warmup_steps": self.warmup_steps,
                "measured_steps": min(self.measure_steps, max(trainer.global_step - self.warmup_steps, 0)),
                "steps_per_second": rate,
                "max_steps": max_steps,
            }
            write_json(info, Path(trainer.default_root_dir) / BUDGET_FILE)


def _duration_seconds(value: str) -> float:
    """Seconds of a ``"DD:HH:MM:SS"`` duration (fewer fields: the last ones, e.g. ``"05:00"`` is 5 minutes)."""
    parts = value.strip().split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if not 1 <= len(numbers) <= 4 or any(n < 0 for n in numbers):
        raise ValueError(f"the training budget {value!r} is not a duration: give seconds or DD:HH:MM:SS")
    return sum(n * f for n, f in zip(reversed(numbers), (1, 60, 3600, 86400), strict=False))
