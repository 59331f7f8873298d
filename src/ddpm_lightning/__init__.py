"""Denoising Diffusion Probabilistic Models (Ho et al. 2020) with PyTorch Lightning."""

__version__ = "0.1.0"
