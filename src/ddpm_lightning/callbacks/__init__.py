"""Lightning callbacks: EMA of the weights, periodic sampling and FID."""

from ddpm_lightning.callbacks.demo_report import DemoReport
from ddpm_lightning.callbacks.ema import EMA
from ddpm_lightning.callbacks.fid import FIDCallback
from ddpm_lightning.callbacks.sampling import SamplingCallback

__all__ = ["EMA", "DemoReport", "FIDCallback", "SamplingCallback"]
