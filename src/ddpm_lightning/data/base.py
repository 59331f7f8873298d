"""What the image data modules share: a global batch size split over processes, seeded loaders that resume in the
middle of an epoch exactly where they stopped, and the images and labels of a batch or item (:func:`images_of`,
:func:`labels_of`)."""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "ImageDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "check_one_batch",
    "images_of",
    "labels_of",
    "per_process_batch_size",
]

# the keys of a mapping batch (Hugging Face datasets' ``with_format("torch")``, dict-yielding data sets), in order
IMAGE_KEYS = ("image", "images", "pixel_values")
LABEL_KEYS = ("label", "labels", "class_labels")


def _key(batch: Mapping, keys: tuple[str, ...], what: str) -> Any:
    found = next((k for k in keys if k in batch), None)
    if found is None:
        raise TypeError(f"a mapping batch holds its {what} under one of {', '.join(keys)}; got keys {', '.join(batch)}")
    return batch[found]


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch or a data set item: data sets yield ``(image, label)`` pairs, bare images, or
    mappings with the images under one of :data:`IMAGE_KEYS` (``{"image": ..., "label": ...}``)."""
    if isinstance(batch, Mapping):
        images = _key(batch, IMAGE_KEYS, "images")
    else:
        images = batch[0] if isinstance(batch, (list, tuple)) and len(batch) > 0 else batch
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            "a batch or item is an image tensor, an (image, label) pair or a mapping of them, got "
            + type(batch).__name__
            + ("" if images is batch else f" whose images are a {type(images).__name__}")
        )
    return images


def labels_of(batch: Any) -> torch.Tensor | None:
    """The class labels of a batch or item (the second element of a pair, or one of :data:`LABEL_KEYS` of a
    mapping) as a long tensor on the images' device; None when it has none."""
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    else:
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    return None if labels is None else torch.as_tensor(labels, device=images_of(batch).device).long()


def check_one_batch(num_images: int, batch_size: int, where: str = "") -> None:
    """ValueError when ``num_images`` training images cannot fill one global batch of ``batch_size``: the loader drops
    a short last batch, so the run would train on nothing (on any number of processes: each reads
    ``num_images // world_size`` images in batches of ``batch_size // world_size``)."""
    if num_images < batch_size:
        raise ValueError(
            f"{num_images} training images{where} are fewer than the batch of {batch_size}: lower --data.batch_size "
            f"to {max(num_images, 1)} or less, or add images"
        )


def stack_items(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images (N, C, H, W) and labels (N,) of data set items, stacked; labels None unless every item has one."""
    images = torch.stack([images_of(item) for item in items])
    labels = [labels_of(item) for item in items]
    return images, torch.stack(labels) if labels and all(y is not None for y in labels) else None


def per_process_batch_size(batch_size: int, world_size: int, accumulate: int = 1) -> int:
    """Split a global batch over `world_size` processes and, on each, `accumulate` micro-batches (gradient
    accumulation: ``trainer.accumulate_grad_batches``); refuse a split that would change the global batch."""
    if batch_size % (world_size * accumulate) != 0:
        accumulation = f" x {accumulate} accumulated micro-batches" if accumulate > 1 else ""
        raise ValueError(
            f"batch_size={batch_size} is the global batch size and must be divisible by the world size "
            f"({world_size} processes){accumulation}; choose a multiple of {world_size * accumulate}."
        )
    return batch_size // (world_size * accumulate)


class ResumableSampler(DistributedSampler):
    """This process's shard of a seeded shuffle per epoch (``DistributedSampler``, ``drop_last``), as ``(epoch, index)``
    keys (for :class:`~ddpm_lightning.data.transforms.SeededFlips`), starting ``start`` items into the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        epoch, self.start = self.epoch, 0
        return iter([(epoch, i) for i in indices])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning saves in checkpoints (``state_dict``): the epoch
    and the batches of it already trained on. A run resumed in the middle of an epoch continues with the next batch
    of the same order (with the same flips), with or without workers.

    ``epoch_batches`` (optional) gives the batches an epoch has (Lightning's ``limit_train_batches``); a state saved
    after the last of them points at the start of the next epoch. A mid-epoch state is refused by a run with
    another world size or global batch size (its batches would be other images); at an epoch boundary both may
    change.
    """

    sampler: ResumableSampler
    epoch_batches: Callable[[], float] | None = None

    def __iter__(self) -> Iterator[Any]:
        # a generator: the body runs at the first batch, after Lightning's set_epoch
        self._epoch, self._batches = self.sampler.epoch, self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, batches = getattr(self, "_epoch", self.sampler.epoch), getattr(self, "_batches", 0)
        limit = min(len(self), self.epoch_batches() if self.epoch_batches is not None else len(self))
        if batches >= limit:
            epoch, batches = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches": batches,
            "batch_size": self.batch_size,
            "world_size": self.sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (state["world_size"], state["world_size"] * state["batch_size"])
        mine = (self.sampler.num_replicas, self.sampler.num_replicas * self.batch_size)
        if state["batches"] and saved != mine:
            raise ValueError(
                f"the checkpoint stopped {state['batches']} batches into epoch {state['epoch']} with {saved[0]} "
                f"processes and a global batch size of {saved[1]}; this run has {mine[0]} and {mine[1]}. Resume in "
                "the middle of an epoch with the same trainer.devices x trainer.num_nodes and data.batch_size, or "
                "from a checkpoint written at the end of an epoch"
            )
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = state["batches"] * self.batch_size


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

    def num_train_images(self) -> int | None:
        """How many images training reads, where it is known before ``setup()`` (the command checks that they fill a
        batch before starting anything); None where it is not."""
        return None

    def check_one_batch(self, accumulate: int = 1) -> None:
        """ValueError when the training images (:meth:`num_train_images`) cannot fill one batch of each of the
        ``accumulate`` optimizer micro-steps; nothing when their number is not known yet."""
        num_images = self.num_train_images()
        if num_images is not None:
            check_one_batch(num_images, self.batch_size // max(accumulate, 1), self._train_images_note())

    def _train_images_note(self) -> str:
        """Where the training images come from, for the message of :func:`check_one_batch` (e.g. `` in FOLDER``)."""
        return ""

    def _update_per_process_batch_size(self) -> None:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        # an optimizer step sees the global batch whatever the gradient accumulation: each process loads micro-batches
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1) if self.trainer is not None else 1
        self.per_process_batch_size = per_process_batch_size(self.batch_size, world_size, accumulate)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader.")
        sampler = None
        if train:
            world_size = self.trainer.world_size if self.trainer is not None else 1
            check_one_batch(len(dataset) // world_size * world_size, self.per_process_batch_size * world_size)  # type: ignore[arg-type]
            # The order of epoch e depends on (seed, e) alone (Lightning calls set_epoch) and the loader's position
            # is saved in checkpoints, so a resumed run sees the batches of an uninterrupted one; each process reads
            # its own shard.
            world_size = self.trainer.world_size if self.trainer is not None else 1
            rank = getattr(self.trainer, "global_rank", 0)
            sampler = ResumableSampler(dataset, world_size, rank, seed=self.seed)
        loader = (ResumableDataLoader if train else DataLoader)(
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
        if train and self.trainer is not None:
            loader.epoch_batches = lambda: self.trainer.num_training_batches
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Global sample indices 0..num_predict-1 for `ddpm predict`: sample i is seeded by i, on any number of GPUs."""
        return DataLoader(torch.arange(self.num_predict), batch_size=self.per_process_batch_size)
