"""Shared test setup: offline loggers, 2 threads, a small fake CIFAR-10 in the real on-disk format, and the demo's
digit classifier briefly trained into a cache folder."""

import hashlib
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.evaluation.digit_classifier import load_or_train_digit_classifier

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
IMAGES_PER_BATCH = 40
CLASSIFIER_TEST_EPOCHS = 2  # the demo trains 6; two reach ~97% and keep the tests fast
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _Py2Str(bytes):
    """A Python 2 `str`, as in the real CIFAR-10 pickles: it loads as `str` under torchvision's
    `encoding="latin1"` and as `bytes` (the b"data" keys of the official snippet) under `encoding="bytes"`."""


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes `_Py2Str` with Python 2's string opcodes; Python 3 has no public way."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: _Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2_str


def _write_py2_pickle(path: Path, entries: dict[str, object]) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({_Py2Str(key.encode()): value for key, value in entries.items()})


def _smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows in CIFAR's channel-major order: random 4x4 colour patches, bilinearly enlarged."""
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(n, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=True)
    return fine.round().clamp(0, 255).to(torch.uint8).reshape(n, 3072).numpy()


def _write_batch(path: Path, rng: np.random.Generator, batch_label: str) -> None:
    _write_py2_pickle(
        path,
        {
            "batch_label": _Py2Str(batch_label.encode()),
            "labels": [int(label) for label in rng.integers(0, 10, IMAGES_PER_BATCH)],
            "data": _smooth_images(rng, IMAGES_PER_BATCH),
            "filenames": [_Py2Str(f"fake_{i:05d}.png".encode()) for i in range(IMAGES_PER_BATCH)],
        },
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def patch_cifar_md5(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's CIFAR10 accept the files in `root/cifar-10-batches-py/` by swapping in their md5s.

    Only the checksums change, so torchvision's real loader and integrity check still run. The patch lives
    in this process: run the CLI in-process (`ddpm_lightning.cli.main([...])`), not as a subprocess.
    """
    folder = Path(root) / CIFAR_FOLDER
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, _md5(folder / name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, _md5(folder / name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


@pytest.fixture(scope="session")
def fake_cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding `cifar-10-batches-py/`: 5 x 40 train and 40 test images. Needs `patch_cifar_md5`."""
    root = tmp_path_factory.mktemp("cifar10")
    folder = root / CIFAR_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", rng, f"training batch {i} of 5")
    _write_batch(folder / "test_batch", rng, "testing batch 1 of 1")
    _write_py2_pickle(
        folder / "batches.meta",
        {
            "num_cases_per_batch": IMAGES_PER_BATCH,
            "label_names": [_Py2Str(name.encode()) for name in LABEL_NAMES],
            "num_vis": 3072,
        },
    )
    return root


@pytest.fixture
def cifar10_dir(fake_cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake CIFAR-10 data_dir with torchvision's md5 check patched for this test: ready to load."""
    patch_cifar_md5(monkeypatch, fake_cifar10_dir)
    return fake_cifar10_dir


@pytest.fixture
def fake_cifar10_tarball(fake_cifar10_dir: Path, tmp_path: Path) -> Path:
    """`cifar-10-python.tar.gz` of the fake batches, alone in a fresh folder. Returns the archive's path."""
    archive = tmp_path / CIFAR_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_cifar10_dir / CIFAR_FOLDER, arcname=CIFAR_FOLDER)
    return archive


@pytest.fixture(scope="session")
def digits() -> EmbeddedDigitsDataModule:
    return EmbeddedDigitsDataModule()


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory: pytest.TempPathFactory, digits: EmbeddedDigitsDataModule) -> Path:
    """A cache folder holding a briefly trained digit classifier, shared by the scorer tests, the demo run and the
    sampler sweep."""
    cache = tmp_path_factory.mktemp("classifier_cache")
    load_or_train_digit_classifier(
        digits.split_arrays("train"), digits.split_arrays("val"), cache_dir=cache, epochs=CLASSIFIER_TEST_EPOCHS
    )
    return cache
