"""Lightning callbacks: EMA of the weights, periodic sampling and FID."""

from ddpm_lightning.callbacks.ema import EMA

__all__ = ["EMA"]
