"""What the image data modules share: a global batch size split over processes, and seeded loaders."""

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def per_process_batch_size(batch_size: int, world_size: int) -> int:
    """Split a global batch over `world_size` processes; refuse a split that would change the global batch."""
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={batch_size} is the global batch size and must be divisible by the world size "
            f"({world_size} processes); choose a multiple of {world_size}."
        )
    return batch_size // world_size


class ImageDataModule(L.LightningDataModule):
    """Base for data modules whose items are `(image, label)` with images float32 (C, H, W) in [-1, 1].

    Subclasses set `name`, `channels`, `image_size` and fill `train_set`, `val_set`, `test_set` in `setup()`.
    """

    name: str
    channels: int
    image_size: int

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        pin_memory: bool | None,
        persistent_workers: bool,
        seed: int,
        num_predict: int = 64,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}.")
        self.batch_size = batch_size
        # World size 1 until setup() sees the trainer.
        self.per_process_batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # Persistent workers only exist when there are workers; DataLoader raises otherwise.
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        if num_predict < 1:
            raise ValueError(f"num_predict must be a positive integer, got {num_predict}.")
        self.num_predict = num_predict
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _update_per_process_batch_size(self) -> None:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        self.per_process_batch_size = per_process_batch_size(self.batch_size, world_size)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        sampler = None
        if train:
            # The order of epoch e depends on (seed, e) alone (Lightning calls set_epoch), so a run resumed at an
            # epoch boundary sees the same batches as an uninterrupted one; each process reads its own shard.
            world_size = self.trainer.world_size if self.trainer is not None else 1
            rank = getattr(self.trainer, "global_rank", 0)
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=self.seed, drop_last=True)
        return DataLoader(
            dataset,
            batch_size=self.per_process_batch_size,
            sampler=sampler,
            # A short last batch would give its images more weight in that step's loss.
            drop_last=train,
            # Seeds the workers' base seed, so it does not depend on the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Global sample indices 0..num_predict-1 for `ddpm predict`: sample i is seeded by i, on any number of GPUs."""
        return DataLoader(torch.arange(self.num_predict), batch_size=self.per_process_batch_size)
