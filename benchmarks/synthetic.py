"""What ``benchmarks/gpu_check.py`` gives ``ddpm fit`` by ``class_path``: CIFAR-10-shaped random data and a step clock.

- :class:`SyntheticCIFAR10`: ``CIFAR10DataModule`` with random uint8 pixels in memory instead of the files, so a run
  goes through the real pipeline (PIL image -> tensor in [-1, 1], seeded flips, the resumable sampler, workers,
  pinned memory) on a machine without the data set.
- :class:`StepClock`: the wall time of a window of training steps, synchronised with the device only at its two ends
  (so the host may run ahead as in a real run), written to a JSON file when training ends; it stops the run at a
  given wall-clock time.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ddpm_lightning.data import CIFAR10DataModule, images_of
from ddpm_lightning.data.transforms import image_transform
from ddpm_lightning.io import write_json


class RandomImages(Dataset):
    """``num_images`` random uint8 RGB images (seeded) with labels 0..9, read as torchvision's CIFAR10 reads its own:
    ``(transform(PIL image), label)``."""

    def __init__(self, num_images: int, image_size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, num_images).tolist()
        self.transform = image_transform(random_flip=False)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


class SyntheticCIFAR10(CIFAR10DataModule):
    """CIFAR-10's data module on :class:`RandomImages` (``num_images`` of them, 32x32): nothing read from disk."""

    name = "synthetic_cifar10"

    def __init__(self, *args: Any, num_images: int = 10_000, **kwargs: Any) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images}")
        super().__init__(*args, **kwargs)
        self.num_images = num_images

    def prepare_data(self) -> None:
        """Nothing to fetch or extract."""

    def _load(self, train: bool, random_flip: bool) -> Dataset:
        return RandomImages(self.num_images, self.image_size, seed=self.seed + (0 if train else 1))


class StepClock(L.Callback):
    """Times training steps ``warmup + 1`` to the last one; writes ``out`` (JSON) when training ends.

    Args:
        out: the JSON file: ``warmup_seconds`` (start of training to the start of the window: set-up, autotuning,
            compilation), ``window_steps``, ``window_seconds``, ``images`` (all processes) and ``stopped_early``.
        warmup: steps before the window.
        stop_at: a ``time.time()`` value at which the run stops (``trainer.should_stop``) after the current step;
            None: no limit.
    """

    def __init__(self, out: str, warmup: int = 10, stop_at: float | None = None) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be 0 or more steps, got {warmup}")
        self.out = out
        self.warmup = warmup
        self.stop_at = stop_at
        self._start: float | None = None
        self._window: float | None = None
        self._steps = 0
        self._images = 0
        self._stopped = False

    def _sync(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._sync(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step == self.warmup:
            self._window = self._sync(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._window is not None:
            images = images_of(batch)
            self._steps += 1
            self._images += len(images) * trainer.world_size
        if self.stop_at is not None and time.time() >= self.stop_at:
            self._stopped = trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = self._sync(pl_module)
        window = None if self._window is None else end - self._window
        write_json(
            {
                "warmup_steps": self.warmup,
                "warmup_seconds": (self._window or end) - self._start,
                "window_steps": self._steps,
                "window_seconds": window,
                "images": self._images,
                "stopped_early": self._stopped,
            },
            self.out,
        )
