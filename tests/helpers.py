"""Helpers several test files use: tiny models, data and runs, fakes of the real formats (imported as
``from helpers import ...``; the fixtures are in conftest.py)."""

import csv
import hashlib
import json
import os
import pickle
import signal as signal_module
import struct
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import FIDCallback, default_callbacks
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation import ablation
from ddpm_lightning.lit_module import DiffusionModule

CIFAR_FOLDER = "cifar-10-batches-py"


CIFAR_ARCHIVE = "cifar-10-python.tar.gz"


IMAGES_PER_BATCH = 40


CLASSIFIER_TEST_EPOCHS = 2  # the demo trains 6; two reach ~97% and keep the tests fast


LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Str(bytes):
    """A Python 2 `str`, as in the real CIFAR-10 pickles: it loads as `str` under torchvision's
    `encoding="latin1"` and as `bytes` (the b"data" keys of the official snippet) under `encoding="bytes"`."""


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes `Py2Str` with Python 2's string opcodes; Python 3 has no public way."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[Py2Str] = _save_py2_str


def write_py2_pickle(path: Path, entries: dict[str, object]) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump({Py2Str(key.encode()): value for key, value in entries.items()})


def _smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3072) uint8 rows in CIFAR's channel-major order: random 4x4 colour patches, bilinearly enlarged."""
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(n, 3, 4, 4)).astype(np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=True)
    return fine.round().clamp(0, 255).to(torch.uint8).reshape(n, 3072).numpy()


def write_cifar_batch(path: Path, rng: np.random.Generator, batch_label: str) -> None:
    write_py2_pickle(
        path,
        {
            "batch_label": Py2Str(batch_label.encode()),
            "labels": [int(label) for label in rng.integers(0, 10, IMAGES_PER_BATCH)],
            "data": _smooth_images(rng, IMAGES_PER_BATCH),
            "filenames": [Py2Str(f"fake_{i:05d}.png".encode()) for i in range(IMAGES_PER_BATCH)],
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


# ------------------------------------------------------ FID: tiny images, a tiny feature extractor, a frozen tiny DDPM
NUM_REAL = 40


IMAGE_SIZE = 8


class TinyExtractor(nn.Module):
    """Deterministic features: 4x4 average-pooled pixels through a fixed random projection, then tanh."""

    num_features = 6

    def __init__(self, channels: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(channels * 16, self.num_features, generator=generator), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return torch.tanh(F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj)  # (N, num_features)


def real_images() -> torch.Tensor:
    """(NUM_REAL, 3, 8, 8) smooth images in [-1, 1]: random 2x2 colours, bilinearly enlarged."""
    coarse = torch.rand(NUM_REAL, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)


class TinyImages(L.LightningDataModule):
    """The protocol FIDCallback needs from a datamodule: `name` and `real_images_dataset(split)`."""

    name = "tiny"

    def __init__(self, batch_size: int = 4):
        super().__init__()
        self.batch_size = batch_size

    def real_images_dataset(self, split: str = "train") -> TensorDataset:
        images = real_images()
        return TensorDataset(images, torch.zeros(len(images), dtype=torch.long))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.real_images_dataset(), batch_size=self.batch_size)


class FrozenDiffusion(DiffusionModule):
    """A tiny DDPM whose weights never change (SGD with lr 0), so each fit samples the same images."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def unet_spec(**init_args: Any) -> dict[str, Any]:
    """A U-Net as a config gives it (``{class_path, init_args}``), which the module builds with its shape, the learned
    variance's channels and its classes; over symmetric down-sampling padding and GroupNorm eps 1e-5, the settings
    the tests' pinned numbers were recorded with."""
    settings = {"downsample_padding": "symmetric", "norm_eps": 1e-5, **init_args}
    return {"class_path": "ddpm_lightning.models.UNet", "init_args": settings}


def tiny_diffusion() -> DiffusionModule:
    torch.manual_seed(0)
    return FrozenDiffusion(
        net=unet_spec(image_size=IMAGE_SIZE, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
        num_timesteps=20,
        schedule={"name": "linear", "beta_end": 0.01},  # rescaled by 1000 / T to 0.5
        lr_schedule={"warmup_steps": 0},
        sampler=SamplerConfig("ddim", 5),
    )


def fid_callback(cache_dir: Path, **kwargs: Any) -> FIDCallback:
    options = {"every_n_steps": None, "num_samples": NUM_REAL, "batch_size": 16, "sampler": SamplerConfig("ddim", 5)}
    return FIDCallback(feature_extractor=TinyExtractor(), cache_dir=str(cache_dir), **{**options, **kwargs})


class DigestDump(FIDCallback):
    """Writes this rank's per-sample image hashes to `dump_dir/rank<r>.json`: spawned workers share no memory."""

    def __init__(self, dump_dir: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.dump_dir = dump_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        path = self.dump_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({str(i): d for i, d in self.sample_digests.items()}))


def closed_form_fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), unbiased covariances S = A^T A / (n - 1).

    With A1, A2 the centred feature rows, S1 S2 has the same non-zero eigenvalues as the small PSD matrix
    A1 A2^T A2 A1^T / ((n1 - 1)(n2 - 1)), so Tr (S1 S2)^(1/2) is the sum of the square roots of its eigenvalues.
    """
    a1, a2 = features1 - features1.mean(0), features2 - features2.mean(0)
    n1, n2 = len(a1), len(a2)
    cross = a1 @ a2.T
    eigenvalues = np.linalg.eigvalsh(cross @ cross.T / ((n1 - 1) * (n2 - 1))).clip(min=0)
    traces = (a1**2).sum() / (n1 - 1) + (a2**2).sum() / (n2 - 1)
    mean_term = ((features1.mean(0) - features2.mean(0)) ** 2).sum()
    return float(mean_term + traces - 2 * np.sqrt(eigenvalues).sum())


# --------------------------------------------------------------------------------------- the `ddpm` command, in-process
def run_cli(*argv: object) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 0


# ------------------------------------------------------- host-device transfers per step, a tiny module and its Trainer
HOST_TRANSFERS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)


LOG_EVERY = 5


EMA_DECAY = 0.9


class _Transfers(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_TRANSFERS
        return func(*args, **(kwargs or {}))


class TransfersPerStep(L.Callback):
    """Host-device transfers from one batch start to the next: a whole step with every hook and callback in it."""

    def __init__(self) -> None:
        self.mode = _Transfers()
        self.starts: list[tuple[int, int]] = []  # (global step, transfers so far)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mode.__enter__()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self.starts.append((trainer.global_step, self.mode.count))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mode.__exit__(None, None, None)

    def per_step(self) -> dict[int, int]:
        return {step: b - a for (step, a), (_, b) in zip(self.starts, self.starts[1:], strict=False)}


def tiny(cls: type[DiffusionModule] = DiffusionModule, **kwargs: Any) -> DiffusionModule:
    torch.manual_seed(0)
    return cls(
        net=unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
        num_timesteps=50, lr_schedule={"warmup_steps": 2}, **kwargs,
    )  # fmt: skip


def trainer(tmp_path: Path, max_steps: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A Trainer with ``callbacks`` and the defaults every fit gets (EMA, graceful stop, progress bar, img/s, ...)."""
    defaults = default_callbacks(EMA_DECAY, progress_bar=kwargs.get("enable_progress_bar", True))
    callbacks = [*callbacks, *defaults]
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=max_steps, log_every_n_steps=LOG_EVERY,
        gradient_clip_val=1.0, enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, **kwargs,
    )  # fmt: skip


# ------------------------------------------------- `ddpm fit` arguments of a tiny run and the weights of its last.ckpt
STEPS_PER_EPOCH = 3


def fit_args(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny U-Net on the embedded digits, epochs of 3 steps, with dropout, EMA, warm-up and flips all on."""
    return [
        "fit",
        "--seed_everything=0",
        "--model.in_channels=1",
        "--model.image_size=16",
        "--model.net=ddpm_lightning.models.UNet",
        "--model.net.init_args.ch=32",
        "--model.net.init_args.ch_mult=[1,2]",
        "--model.net.init_args.num_res_blocks=1",
        "--model.net.init_args.attn_resolutions=[8]",
        "--model.net.init_args.dropout=0.1",
        "--model.num_timesteps=50",
        "--model.lr_schedule.warmup_steps=4",
        "--data=ddpm_lightning.data.EmbeddedDigitsDataModule",
        "--data.batch_size=4",
        "--data.image_size=16",
        "--data.random_flip=true",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        '--trainer.callbacks+={"class_path": "ddpm_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}',
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.every_n_train_steps={STEPS_PER_EPOCH}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=0",
        *extra,
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """EMA weights (state_dict), raw weights (current_model_state) and Adam moments of the run's last.ckpt."""
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    out = {f"ema.{k}": v for k, v in checkpoint["state_dict"].items()}
    out |= {f"raw.{k}": v for k, v in checkpoint["current_model_state"].items()}
    for i, state in checkpoint["optimizer_states"][0]["state"].items():
        out |= {f"adam.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)}
    return out


# ----------------------------------------------------------------------------- a run folder as `ddpm ablate` leaves it
def write_run(out: Path, schedule: str, seed: int, losses: list[float], fids: dict[int, float], wall: float) -> None:
    """A run folder as `ddpm ablate` leaves it: a CSVLogger metrics.csv and run.json."""
    folder = ablation.run_dir(out, schedule, seed) / "csv" / "version_0"
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/fid"])
        for step, loss in enumerate(losses):
            writer.writerow([0, step, loss, ""])
            if step in fids:
                writer.writerow([0, step, "", fids[step]])
    (folder.parents[1] / "run.json").write_text(json.dumps({"schedule": schedule, "seed": seed, "wall_time_s": wall}))


def one_line_cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of ``ddpm ARGV``, which must exit with status 2 and a single line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


class SignalAt(L.Callback):
    """Sends ``signal`` to this process during optimizer step ``step`` (1-based), as a user's Ctrl-C or a scheduler
    (SLURM signals every task). In a ``ddpm fit`` of the tests: ``{"class_path": "helpers.SignalAt", ...}``."""

    def __init__(self, step: int, signal: str):
        self.step, self.signal = step, signal

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), getattr(signal_module, self.signal))
