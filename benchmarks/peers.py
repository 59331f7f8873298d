"""The networks the suite compares: ours and the PyTorch peers, all called as ``net(x_t, t) -> prediction``.

- ``diffusers``: ``UNet2DModel`` configured as the original CIFAR-10 network (``google/ddpm-cifar10-32``'s config,
  with dropout 0.1 as in training): the same architecture and the same 35,746,307 parameters as ours.
- ``dd_pytorch``: denoising-diffusion-pytorch's ``Unet(dim=128, dim_mults=(1, 2, 2, 2))`` with dropout 0.1, the
  package's CIFAR-10 recipe; a different design (RMSNorm, linear attention at every level, 28.5M parameters).

The peers come with the ``bench`` extra (``pip install -e '.[bench]'``); a missing one is skipped with that hint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ddpm_lightning.models import UNet


class _Diffusers(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=None,
            norm_eps=1e-6,
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            dropout=0.1,
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t).sample


class _DDPytorch(nn.Module):
    def __init__(self):
        super().__init__()
        from denoising_diffusion_pytorch import Unet

        self.net = Unet(dim=128, dim_mults=(1, 2, 2, 2), dropout=0.1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t)


MODELS: dict[str, Callable[[], nn.Module]] = {"ours": UNet, "diffusers": _Diffusers, "dd_pytorch": _DDPytorch}
PACKAGES = {"ours": "ddpm-lightning", "diffusers": "diffusers", "dd_pytorch": "denoising-diffusion-pytorch"}


def build(name: str) -> nn.Module:
    """A freshly initialised network; ImportError names the extra that installs a missing peer."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    try:
        return MODELS[name]()
    except ImportError as error:
        raise ImportError(f"{name} needs {PACKAGES[name]}: pip install -e '.[bench]' ({error})") from error
