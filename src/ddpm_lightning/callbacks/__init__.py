"""Lightning callbacks: EMA and post-hoc EMA of the weights, resilience, tracking, periodic sampling, FID and bits/dim
(on one base for evaluations every N steps, :class:`EveryNSteps`), the demo report, the autoguidance guide's
checkpoint and the training budget of an ablation run (:class:`TrainingBudget`).

:func:`default_callbacks` are the ones every ``ddpm fit`` gets (the CLI adds them, visibly: its ``default_callbacks``
option lists them); Python code that builds its own Trainer passes them itself.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from ddpm_lightning.callbacks.bpd import BPDCallback
from ddpm_lightning.callbacks.budget import TrainingBudget
from ddpm_lightning.callbacks.demo_report import DemoReport
from ddpm_lightning.callbacks.ema import EMA, PowerEMA
from ddpm_lightning.callbacks.fid import FIDCallback
from ddpm_lightning.callbacks.guide import GuideCheckpoint, GuideTraining
from ddpm_lightning.callbacks.loss_weight import LossWeightCurve
from ddpm_lightning.callbacks.periodic import EveryNSteps
from ddpm_lightning.callbacks.posthoc_ema import PostHocEMA
from ddpm_lightning.callbacks.resilience import FinalCheckpoint, GracefulStop, RNGStates, last_checkpoint_path
from ddpm_lightning.callbacks.sampling import SamplingCallback
from ddpm_lightning.callbacks.tracking import ImagesPerSecond, ProgressBar, WandbRunId
from ddpm_lightning.callbacks.writer import SampleWriter

__all__ = [
    "DEFAULT_CALLBACKS",
    "BPDCallback",
    "EMA",
    "DemoReport",
    "EveryNSteps",
    "FIDCallback",
    "FinalCheckpoint",
    "GracefulStop",
    "GuideCheckpoint",
    "GuideTraining",
    "ImagesPerSecond",
    "LossWeightCurve",
    "PostHocEMA",
    "PowerEMA",
    "ProgressBar",
    "RNGStates",
    "SampleWriter",
    "SamplingCallback",
    "TrainingBudget",
    "WandbRunId",
    "default_callbacks",
    "last_checkpoint_path",
]

#: The classes of :func:`default_callbacks`, in order.
DEFAULT_CALLBACKS: tuple[type[Callback], ...] = (
    EMA,
    RNGStates,
    GracefulStop,
    FinalCheckpoint,
    ProgressBar,
    ImagesPerSecond,
    WandbRunId,
)


def default_callbacks(ema_decay: float | None = 0.9999, *, progress_bar: bool = True) -> list[Callback]:
    """The callbacks every fit gets: the EMA of the weights (``EMA(ema_decay)``; None: 0.9999, Ho et al.'s; 0: no
    EMA), saved RNG states, a graceful stop on SIGTERM/SIGUSR1, a final ``last.ckpt``, a progress bar without
    per-step host syncs (leave it out, ``progress_bar=False``, for a Trainer with ``enable_progress_bar=False``),
    images per second and the W&B run id. A run with another average (:class:`PostHocEMA`) leaves the EMA out.
    """
    ema_decay = 0.9999 if ema_decay is None else ema_decay
    ema = [EMA(ema_decay)] if ema_decay > 0 else []
    bar = [ProgressBar()] if progress_bar else []
    return [*ema, RNGStates(), GracefulStop(), FinalCheckpoint(), *bar, ImagesPerSecond(), WandbRunId()]
