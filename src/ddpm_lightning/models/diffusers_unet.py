"""A diffusers ``UNet2DModel`` as the injected network: ``net(x_t, t)`` returns a tensor, labels go to ``class_labels``.

diffusers is imported only when such a network is built (``pip install diffusers``); the rest of the package runs
without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["DiffusersUNet", "import_diffusers", "plain_config"]


def import_diffusers() -> ModuleType:
    """The diffusers package, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(
            "this needs the diffusers package, which ddpm-lightning does not install: pip install diffusers "
            "(or pip install -e '.[dev]')"
        ) from err
    return diffusers


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config as plain types (lists, not tuples), without its private ``_*`` keys: what a checkpoint
    stores (it loads with ``weights_only=True``) and what ``from_config`` takes back."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in config.items() if not k.startswith("_")}


class DiffusersUNet(nn.Module):
    """``UNet2DModel.from_config(config)`` called as ``net(x_t, t)`` (or ``net(x_t, t, y=labels)``, given to the
    model as ``class_labels``), returning the output tensor rather than diffusers' output object.

    Args:
        config: a ``UNet2DModel`` config (its ``config.json``), e.g. ``DiffusersUNet.from_pretrained(DIR).init_args``;
            the weights come from the checkpoint (or :meth:`from_pretrained`).
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.unet = import_diffusers().UNet2DModel.from_config(dict(config))
        self.init_args = {"config": plain_config(self.unet.config)}
        size = self.unet.config.sample_size
        if not isinstance(size, int):
            height, width = size
            if height != width:
                raise ValueError(f"only square images are supported, the UNet2DModel has sample_size {list(size)}")
            size = height
        self.image_size = int(size)
        self.in_channels = int(self.unet.config.in_channels)

    @classmethod
    def from_pretrained(cls, source: str | Path, subfolder: str | None = None) -> DiffusersUNet:
        """The ``UNet2DModel`` saved in a folder or hub id (``subfolder``: e.g. ``"unet"`` of a pipeline folder)."""
        unet = import_diffusers().UNet2DModel.from_pretrained(str(source), subfolder=subfolder, low_cpu_mem_usage=False)
        net = cls(unet.config)
        net.unet.load_state_dict(unet.state_dict())
        return net

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=y).sample
