"""Networks: the DDPM U-Net, EDM2's magnitude-preserving U-Net, and a diffusers ``UNet2DModel`` adapter (needs
``pip install diffusers``)."""

from ddpm_lightning.models.diffusers_unet import DiffusersUNet
from ddpm_lightning.models.mp_unet import MPUNet
from ddpm_lightning.models.unet import UNet

__all__ = ["DiffusersUNet", "MPUNet", "UNet"]
