"""Networks: the DDPM U-Net."""

from ddpm_lightning.models.unet import UNet

__all__ = ["UNet"]
