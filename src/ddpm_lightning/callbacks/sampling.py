"""Periodic samples during training: a grid of images and a strip of the reverse chain x_T ... x_0, as PNG files
and in every attached logger that takes images.

Under DDP only global rank 0 samples, writes and logs. Sampling runs the EMA copy's U-Net directly (not the
DDP-wrapped module) and has no collective operations, so the other ranks simply wait for rank 0 at the next
gradient all-reduce; no barrier is needed.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import Logger
from torchvision.utils import make_grid

from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.diffusion import Sampler, Spacing, check_sampler, sampling_timesteps

__all__ = ["SamplingCallback", "chain_timesteps", "image_grid", "log_image", "render_samples", "sampler_label"]


def chain_timesteps(timesteps: list[int], count: int) -> list[int]:
    """``count`` timesteps evenly spaced over a sampler's visited ``timesteps`` (high to low), the first included."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    index = torch.linspace(0, len(timesteps) - 1, min(count, len(timesteps))).round().long().tolist()
    return [timesteps[i] for i in index]


def sampler_label(sampler: str, num_steps: int, eta: float = 0.0, spacing: str = "uniform") -> str:
    """A short name of the sampling setting for tags and file names: ``ddim50``, ``ddim50_eta1``, ``dpmpp_2m20``,
    ``ddim50_quad`` (quadratic spacing)."""
    label = f"{sampler}{num_steps}" + (f"_eta{eta:g}" if sampler == "ddim" and eta > 0 else "")
    return label + ("_quad" if spacing == "quadratic" else "")


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """A uint8 (3, H', W') grid, about square, of images (B, C, H, W) in [-1, 1]."""
    return make_grid(to_uint8(images.cpu()), nrow=max(1, round(len(images) ** 0.5)), padding=2, pad_value=255)


@torch.no_grad()
def render_samples(
    pl_module: L.LightningModule,
    num_samples: int,
    chain_samples: int,
    chain_steps: int,
    *,
    sampler: Sampler,
    num_steps: int | None,
    eta: float,
    seed: int,
    spacing: Spacing = "uniform",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` images (sample i seeded by ``seed + i``) with the module's sampling (EMA) weights and
    ``num_steps`` network evaluations (None: all T) of ``sampler``.

    Returns the images in [-1, 1] (B, C, H, W) on the CPU, a uint8 grid (3, H', W') of them, and a uint8 strip
    (3, H'', W'') whose rows are the first ``chain_samples`` samples and whose columns are x_t at ``chain_steps``
    evenly spaced visited timesteps (x_T first) followed by the final x_0.
    """
    T = pl_module.diffusion.num_timesteps
    visited = sampling_timesteps(T, sampler, num_steps, spacing)
    steps = chain_timesteps(visited, chain_steps)
    x0, chain = pl_module.sample(
        num_samples,
        seeds=list(range(seed, seed + num_samples)),
        sampler=sampler,
        num_steps=len(visited),
        eta=eta,
        spacing=spacing,
        return_steps=steps,
    )
    x0 = x0.cpu()
    grid = image_grid(x0)
    rows = min(chain_samples, num_samples)
    columns = [chain[t][:rows] for t in steps] + [x0[:rows]]  # each (rows, C, H, W)
    strip = torch.stack(columns, dim=1).flatten(0, 1)  # (rows * columns, C, H, W), one row per sample
    strip = make_grid(to_uint8(strip), nrow=len(columns), padding=2, pad_value=255)
    return x0, grid, strip


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


class SamplingCallback(Callback):
    """Every ``every_n_steps`` optimizer steps and at the end of training, sample from a fixed seed with the EMA
    weights and write ``<run>/samples/step_XXXXXXX_<sampler>_grid.png`` and ``..._chain.png``.

    ``<run>`` is ``trainer.log_dir`` (the logger's version folder, or ``default_root_dir`` without a logger). The
    same images go to TensorBoard (``add_image``) and W&B (``log_image``) as ``samples/<sampler>_grid`` and
    ``samples/<sampler>_chain``, where ``<sampler>`` reads e.g. ``ddim50`` (see :func:`sampler_label`).

    Args:
        every_n_steps: sampling period in optimizer steps.
        num_samples: images in the grid; sample i is seeded by ``seed + i``, so the grid changes only with training.
        chain_samples: samples (rows) shown in the reverse-chain strip.
        chain_steps: x_t snapshots per row, evenly spaced over the visited timesteps; x_0 is added as a last column.
        sampler, num_steps, eta, spacing: ``"ddpm"``, ``"ddim"`` or ``"dpmpp_2m"`` with ``num_steps`` network
            evaluations (None: all T), DDIM's eta and the timestep spacing; DDIM with 50 steps by default, cheap
            enough for monitoring.
        seed: seed of the first sample.
        on_train_end: also sample once when training ends.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 64,
        chain_samples: int = 8,
        chain_steps: int = 10,
        sampler: Sampler = "ddim",
        num_steps: int | None = 50,
        eta: float = 0.0,
        seed: int = 0,
        on_train_end: bool = True,
        spacing: Spacing = "uniform",
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if num_samples < 1 or chain_samples < 1 or chain_steps < 1:
            raise ValueError(
                f"num_samples, chain_samples and chain_steps must be >= 1, got {num_samples}, {chain_samples}, "
                f"{chain_steps}"
            )
        check_sampler(sampler, spacing)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.chain_samples = chain_samples
        self.chain_steps = chain_steps
        self.sampler = sampler
        self.num_steps = num_steps
        self.eta = eta
        self.spacing = spacing
        self.seed = seed
        self.sample_on_train_end = on_train_end
        self.folder: Path | None = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        T = pl_module.diffusion.num_timesteps
        # check the sampler against the model now rather than at the first sampling
        self._visited = sampling_timesteps(T, self.sampler, self.num_steps, self.spacing)
        # trainer.log_dir broadcasts from rank 0, so it is resolved here, where every rank calls it
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    @property
    def label(self) -> str:
        return sampler_label(self.sampler, len(self._visited), self.eta, self.spacing)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.sample_and_log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.sample_on_train_end:
            self.sample_and_log(trainer, pl_module)

    def sample_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Sample once at the current step (at most once per step, on global rank 0); returns the files written."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step or self.folder is None:
            return []
        self._last_step = step
        # imported here: ddpm_lightning.sampling imports the LightningModule, which imports this package
        from ddpm_lightning.sampling import save_png

        _, grid, strip = render_samples(
            pl_module,
            self.num_samples,
            self.chain_samples,
            self.chain_steps,
            sampler=self.sampler,
            num_steps=self.num_steps,
            eta=self.eta,
            seed=self.seed,
            spacing=self.spacing,
        )
        paths = []
        for kind, image in (("grid", grid), ("chain", strip)):
            path = self.folder / f"step_{step:07d}_{self.label}_{kind}.png"
            save_png(image, path)
            paths.append(path)
            for logger in trainer.loggers:
                log_image(logger, f"samples/{self.label}_{kind}", image, step)
        return paths
