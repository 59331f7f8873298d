"""Any folder tree of PNG / JPEG / WebP images, resized and center-cropped to a square (CelebA-HQ, LSUN, your own)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.transforms import SeededFlips, ToModelRange

__all__ = ["EXTENSIONS", "ImageFolderDataModule", "UnreadableImageError"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test", "all")
# what PIL raises for a file that is not an image it can decode, or is cut short
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (``unreadable="stop"``, or one that fails while training)."""


def _check_image(path: Path) -> str | None:
    """None when PIL can open ``path`` and its data pass PIL's checks, else the reason in a few words."""
    try:
        with Image.open(path) as img:
            img.verify()
    except _PIL_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


class _ImageFiles(Dataset):
    """``(image, label)`` items of a list of files: float32 (C, S, S) in [-1, 1], resized so that the shorter side
    is S (bicubic, antialiased) and center-cropped."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int, channels: int):
        self.files, self.labels = files, labels
        self.mode = "L" if channels == 1 else "RGB"
        self.transform = transforms.Compose(
            [
                transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                ToModelRange(),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                image = img.convert(self.mode)
        except _PIL_ERRORS as err:
            # not PIL's traceback: the file and what is wrong with it
            raise UnreadableImageError(f"cannot read the image {path}: {type(err).__name__}: {err}") from None
        return self.transform(image), self.labels[i]


class ImageFolderDataModule(ImageDataModule):
    """The images of a folder tree as ``(image, label)`` batches, images float32 (B, C, S, S) in [-1, 1].

    Every ``.png``, ``.jpg``, ``.jpeg`` and ``.webp`` file below ``root`` is resized so that its shorter side is
    ``image_size`` and center-cropped to a square; grey and colour files alike become ``channels`` channels. The
    label is the index of the file's top sub-folder among the sorted sub-folder names (0 for files directly in
    ``root``), for class-conditional training. A seeded permutation holds out ``val_fraction`` of the files ("val" and
    "test"; at least one, and at least one left for training); "train" is the rest, flipped left-right at random when
    ``random_flip``.

    Files named in ``exclude`` (e.g. ``grid.png``, the grid ``ddpm sample`` writes beside its samples) are left out.
    Files PIL cannot open are found when the folder is first listed and reported by name: ``unreadable="skip"`` leaves
    them out with one warning (their number in ``num_unreadable``), ``"stop"`` raises :class:`UnreadableImageError`.
    ``batch_size`` is the global batch size, divided by the world size in ``setup()``.

    ``name`` (the FID reference statistics' cache key) holds a digest of the relative path, size and modification
    time of every file: statistics are reused only for the same folder contents.
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: Literal[1, 3] = 3,
        batch_size: int = 64,
        num_workers: int = 4,
        random_flip: bool = True,
        val_fraction: float = 0.01,
        unreadable: Literal["skip", "stop"] = "skip",
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        num_predict: int = 64,
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed, num_predict)
        self.save_hyperparameters()
        self.exclude = tuple(exclude)
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if unreadable not in ("skip", "stop"):
            raise ValueError(f"unknown unreadable={unreadable!r}; allowed: skip, stop")
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip
        self.val_fraction = val_fraction
        self.unreadable = unreadable
        self._listing: tuple[list[Path], list[int], list[str], list[Path]] | None = None

    # -------------------------------------------------------------------------------------------- the files
    def _list(self) -> tuple[list[Path], list[int], list[str], list[Path]]:
        """(readable files, their labels, the class names, unreadable files), listed and checked once."""
        if self._listing is not None:
            return self._listing
        found = sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in EXTENSIONS and p.name not in self.exclude and p.is_file()
        )
        if not found:
            raise FileNotFoundError(f"no {'/'.join(EXTENSIONS)} files below {self.root}")
        bad = [(p, reason) for p in found if (reason := _check_image(p)) is not None]
        if bad:
            names = "; ".join(f"{p.relative_to(self.root)} ({reason})" for p, reason in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            message = f"{len(bad)} of {len(found)} files below {self.root} cannot be read as images: {names}{more}"
            if self.unreadable == "stop":
                raise UnreadableImageError(f"{message}; remove them, or set unreadable: skip")
            warnings.warn(f"{message}; skipped", stacklevel=2)
        unreadable = {p for p, _ in bad}
        files = [p for p in found if p not in unreadable]
        if not files:
            raise UnreadableImageError(f"none of the {len(found)} image files below {self.root} can be read")
        tops = [p.relative_to(self.root).parts for p in files]
        classes = sorted({parts[0] for parts in tops if len(parts) > 1})
        labels = [classes.index(parts[0]) if len(parts) > 1 else 0 for parts in tops]
        self._listing = files, labels, classes, [p for p, _ in bad]
        return self._listing

    @property
    def classes(self) -> list[str]:
        """The sub-folder names; label i is ``classes[i]``."""
        return self._list()[2]

    @property
    def num_unreadable(self) -> int:
        """How many image files were left out because they cannot be read."""
        return len(self._list()[3])

    @property
    def name(self) -> str:
        files = self._list()[0]
        digest = hashlib.sha256()
        for path in files:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"imagefolder-{self.root.name}-{self.channels}ch-{digest.hexdigest()[:16]}"

    def split_indices(self, split: Literal["train", "val", "test", "all"]) -> list[int]:
        """Indices (into the readable files) of ``split`` (``"all"``: every file); the same split for a given seed.
        Validation holds ``round(val_fraction * n)`` images, at least one and at most n - 1."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        n = len(self._list()[0])
        if split == "all":
            return list(range(n))
        if n < 2:
            raise ValueError(f"{self.root} holds {n} readable image: training and validation need at least 2")
        num_val = min(max(round(self.val_fraction * n), 1), n - 1)  # each split keeps at least one image
        # a generator of its own: the split depends on the seed alone, never on the global RNG
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return order[num_val:] if split == "train" else order[:num_val]

    def num_train_images(self) -> int:
        """The number of images of the "train" split (the folder is listed and checked once)."""
        return len(self.split_indices("train"))

    def _train_images_note(self) -> str:
        n = len(self._list()[0])
        return f" in {self.root} ({n} images, {n - self.num_train_images()} held out for validation)"

    def real_images_dataset(self, split: Literal["train", "val", "test", "all"] = "train") -> Dataset:
        """Un-augmented ``(image, label)`` items of ``split``, e.g. for FID reference statistics."""
        files, labels, _, _ = self._list()
        index = self.split_indices(split)
        return _ImageFiles([files[i] for i in index], [labels[i] for i in index], self.image_size, self.channels)

    def setup(self, stage: str | None = None) -> None:
        self._update_per_process_batch_size()
        if stage == "predict":  # sampling needs no images
            return
        if stage in (None, "fit"):
            # flips decided by (seed, epoch, index): restored exactly on resume (SeededFlips)
            self.train_set = SeededFlips(self.real_images_dataset("train"), self.seed, self.random_flip)
        if self.val_set is None:
            self.val_set = self.test_set = self.real_images_dataset("val")
