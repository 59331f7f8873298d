"""Periodic samples during training: a grid of images and a strip of the reverse chain x_T ... x_0, as PNG files
and in every attached logger that takes images.

Under DDP only global rank 0 samples, writes and logs. Sampling runs the EMA copy's network directly (not the
DDP-wrapped module) and has no collective operations, so the other ranks simply wait for rank 0 at the next
gradient all-reduce; no barrier is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import Logger
from torchvision.utils import make_grid

from ddpm_lightning.callbacks.periodic import EveryNSteps
from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.diffusion import Sampler, SamplerConfig
from ddpm_lightning.io import image_grid, save_png
from ddpm_lightning.sampling import class_rows

__all__ = [
    "MONITORING_SAMPLER",
    "SamplingCallback",
    "chain_timesteps",
    "log_image",
    "render_samples",
]

#: The callbacks' default: 50 deterministic DDIM steps, cheap enough for monitoring during training.
MONITORING_SAMPLER = SamplerConfig("ddim", 50)


def chain_timesteps(timesteps: list[int], count: int) -> list[int]:
    """``count`` timesteps evenly spaced over a sampler's visited ``timesteps`` (high to low), the first included."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    index = torch.linspace(0, len(timesteps) - 1, min(count, len(timesteps))).round().long().tolist()
    return [timesteps[i] for i in index]


@torch.no_grad()
def render_samples(
    pl_module: L.LightningModule,
    num_samples: int,
    chain_samples: int,
    chain_steps: int,
    *,
    sampler: SamplerConfig | Mapping[str, Any] | Sampler | None = None,
    seed: int = 0,
    guide: L.LightningModule | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` images (sample i seeded by ``seed + i``) with the module's sampling (EMA) weights and
    the ``sampler`` setting (None: the module's own; a name: that sampler with the module's other settings);
    ``guide``: autoguidance's weaker model (:meth:`DiffusionModule.sample`).

    Returns the images in [-1, 1] (B, C, H, W) on the CPU, a uint8 grid (3, H', W') of them, and a uint8 strip
    (3, H'', W'') whose rows are the first ``chain_samples`` samples and whose columns are x_t at ``chain_steps``
    evenly spaced visited timesteps (x_T first) followed by the final x_0. A class-conditional model gives sample i
    the class i mod num_classes and its grid one row per class.
    """
    config = pl_module.sampler_config_for(sampler)
    steps = chain_timesteps(config.visited(pl_module.diffusion), chain_steps)
    K = pl_module.num_classes
    y = None if K is None else [i % K for i in range(num_samples)]
    seeds = list(range(seed, seed + num_samples))
    x0, chain = pl_module.sample(num_samples, config, seeds=seeds, return_steps=steps, y=y, guide=guide)
    x0 = x0.cpu()
    rows = min(chain_samples, num_samples)
    columns = [chain[t][:rows] for t in steps] + [x0[:rows]]  # each (rows, C, H, W)
    strip = torch.stack(columns, dim=1).flatten(0, 1)  # (rows * columns, C, H, W), one row per sample
    strip = make_grid(to_uint8(strip), nrow=len(columns), padding=2, pad_value=255)
    if y is None:
        return x0, image_grid(x0), strip
    per_row = max(1, num_samples // K)
    return x0, image_grid(class_rows(x0, y, range(K), per_row), nrow=per_row), strip


def log_image(logger: Logger, tag: str, image: torch.Tensor, step: int) -> bool:
    """Log a uint8 (C, H, W) image to a logger that takes images; False for loggers that do not (e.g. CSV)."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, global_step=step, dataformats="CHW")
        return True
    if isinstance(logger, WandbLogger):
        # W&B wants HWC uint8 arrays: float arrays are read as [0, 255] too and come out black
        logger.log_image(key=tag, images=[image.permute(1, 2, 0).numpy()], step=step)
        return True
    return False


class SamplingCallback(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps and at the end of training, sample from a fixed seed with the EMA
    weights and write ``<run>/samples/step_XXXXXXX_<sampler>_grid.png`` and ``..._chain.png``.

    ``<run>`` is ``trainer.log_dir`` (the logger's version folder, or ``default_root_dir`` without a logger). The
    same images go to TensorBoard (``add_image``) and W&B (``log_image``) as ``samples/<sampler>_grid`` and
    ``samples/<sampler>_chain``, where ``<sampler>`` reads e.g. ``ddim50`` (:meth:`SamplerConfig.label`). The grid of
    a class-conditional model has one row per class (sample i has the class i mod num_classes).

    Args:
        every_n_steps: sampling period in optimizer steps; None: only when training ends.
        num_samples: images in the grid; sample i is seeded by ``seed + i``, so the grid changes only with training.
        chain_samples: samples (rows) shown in the reverse-chain strip.
        chain_steps: x_t snapshots per row, evenly spaced over the visited timesteps; x_0 is added as a last column.
        sampler: the sampler setting, e.g. ``{name: ddim, steps: 50}`` (the default: cheap enough for monitoring;
            ``steps: null`` is the full chain); a bare name runs 50 network evaluations of that sampler.
        seed: seed of the first sample.
        on_train_end: also sample once when training ends.
    """

    def __init__(
        self,
        every_n_steps: int | None = 5000,
        num_samples: int = 64,
        chain_samples: int = 8,
        chain_steps: int = 10,
        sampler: SamplerConfig | Mapping[str, Any] | Sampler = MONITORING_SAMPLER,
        *,
        seed: int = 0,
        on_train_end: bool = True,
    ):
        super().__init__(every_n_steps, on_fit_end=on_train_end)
        if num_samples < 1 or chain_samples < 1 or chain_steps < 1:
            raise ValueError(
                f"num_samples, chain_samples and chain_steps must be >= 1, got {num_samples}, {chain_samples}, "
                f"{chain_steps}"
            )
        self.sampler = SamplerConfig.parse(sampler, MONITORING_SAMPLER)
        self.num_samples = num_samples
        self.chain_samples = chain_samples
        self.chain_steps = chain_steps
        self.seed = seed
        self.folder: Path | None = None
        self._num_timesteps: int | None = None
        self._sampled_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # check the sampler against the model now rather than at the first sampling
        self._num_timesteps = pl_module.diffusion.num_timesteps
        self.sampler.timesteps(self._num_timesteps)
        # trainer.log_dir broadcasts from rank 0, so it is resolved here, where every rank calls it
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    @property
    def label(self) -> str:
        """The sampler's label in file names and logger tags, e.g. ``ddim50`` (known once the callback is set up)."""
        if self._num_timesteps is None:
            raise RuntimeError("the label needs the model's number of timesteps: set the callback up first")
        return self.sampler.label(self._num_timesteps)

    def at_step(self, trainer: L.Trainer, pl_module: L.LightningModule, fit_end: bool) -> None:
        self.sample_and_log(trainer, pl_module)

    def sample_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Sample once at the current step (at most once per step, on global rank 0); returns the files written."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._sampled_step or self.folder is None:
            return []
        self._sampled_step = step
        _, grid, strip = render_samples(
            pl_module, self.num_samples, self.chain_samples, self.chain_steps, sampler=self.sampler, seed=self.seed
        )
        paths = []
        for kind, image in (("grid", grid), ("chain", strip)):
            path = save_png(image, self.folder / f"step_{step:07d}_{self.label}_{kind}.png")
            paths.append(path)
            for logger in trainer.loggers:
                log_image(logger, f"samples/{self.label}_{kind}", image, step)
        return paths
