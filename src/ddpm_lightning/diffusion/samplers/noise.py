"""The noise of a reverse chain: standard normal draws on the CPU from explicit generators, then moved to the
model's device, so a seed gives the same samples on any device, and sample i of an evaluation can be seeded by i
whatever the number of processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NoiseSource:
    """Standard normal draws of a batch from CPU generators: one shared, or one per sample (``seeds``)."""

    def __init__(
        self,
        batch_shape: tuple[int, ...],
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ):
        if sum(x is not None for x in (seed, seeds, generator)) > 1:
            raise ValueError("give at most one of seed, seeds and generator")
        self.shape = batch_shape
        if seeds is not None:
            if len(seeds) != batch_shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_shape[0]}")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        else:
            if generator is None:
                generator = torch.Generator()
                generator.manual_seed(seed if seed is not None else torch.seed())
            self.generators = [generator]

    def draw(self, device: torch.device | str) -> torch.Tensor:
        if len(self.generators) == 1:
            noise = torch.randn(self.shape, generator=self.generators[0])
        else:
            noise = torch.stack([torch.randn(self.shape[1:], generator=g) for g in self.generators])
        return noise.to(device)
