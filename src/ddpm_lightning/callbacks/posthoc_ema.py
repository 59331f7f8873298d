"""Post-hoc EMA (Karras et al. 2024, EDM2 Sec. 3 and App. C), the callback: track power-function EMAs of the network
and store snapshots of them; the maths and the reconstruction after training are in :mod:`ddpm_lightning.posthoc`.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ddpm_lightning import compat
from ddpm_lightning.averaging import WeightAverage
from ddpm_lightning.io import atomic_write
from ddpm_lightning.posthoc import power_beta, sigma_rel_to_gamma

__all__ = ["SNAPSHOT_DTYPES", "PostHocEMA"]

SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SnapshotDtype = Literal["float32", "bfloat16", "float16"]


class PostHocEMA(L.Callback, WeightAverage):
    """Power-function EMAs of the network for post-hoc EMA (EDM2), behind the averaging interface.

    Keeps one average per ``sigma_rels`` (EDM2: 0.05 and 0.10), updated after every optimizer step with a beta
    computed on the host from the trainer's step count (one foreach lerp per profile, no host-device sync). The
    profile ``sampling_sigma_rel`` is the run's average: sampling, validation and the checkpoints' ``state_dict`` use
    it (the rule of :mod:`ddpm_lightning.averaging`; the raw weights go to ``current_model_state``).

    Every ``snapshot_every`` optimizer steps rank 0 writes ``<folder>/<step>.pt`` (atomically): every profile's
    averaged network in ``snapshot_dtype``, the profiles' sigma_rel and gamma, the module's hyper-parameters and
    ``diffusion.*`` buffers. ``folder`` defaults to ``<trainer.default_root_dir>/posthoc_ema``. A resumed run restores
    the profiles from the checkpoint (the callback state) and continues the snapshots. ``ddpm posthoc-ema --run DIR``
    reconstructs any sigma_rel from them (:func:`reconstruct_posthoc_ema`). Disk: one snapshot holds
    ``len(sigma_rels)`` copies of the network (4 bytes a parameter in float32).
    """

    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        sampling_sigma_rel: float | None = None,
        snapshot_every: int = 1000,
        snapshot_dtype: SnapshotDtype = "float32",
        folder: str | None = None,
    ) -> None:
        super().__init__()
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels must be one or more distinct values, got {list(sigma_rels)}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.sampling_sigma_rel = self.sigma_rels[-1] if sampling_sigma_rel is None else float(sampling_sigma_rel)
        if self.sampling_sigma_rel not in self.sigma_rels:
            raise ValueError(
                f"sampling_sigma_rel={sampling_sigma_rel} is not one of the tracked sigma_rels {list(self.sigma_rels)}"
            )
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1 (optimizer steps), got {snapshot_every}")
        if snapshot_dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"unknown snapshot_dtype {snapshot_dtype!r}; allowed: {', '.join(SNAPSHOT_DTYPES)}")
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.folder = folder
        self.step = 0  # the optimizer step of the last update
        self._averages: list[L.LightningModule] | None = None
        self._pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None
        self._initial_net: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------ the averaging interface
    def average_module(self) -> L.LightningModule | None:
        """The module holding the ``sampling_sigma_rel`` profile's network during and after fit, else None."""
        return None if self._averages is None else self._averages[self.sigma_rels.index(self.sampling_sigma_rel)]

    def start_from(self, net_weights: dict[str, torch.Tensor]) -> None:
        """Start every profile at ``net_weights``. The first update (beta_1 = 0) replaces it with the trained
        weights, as a power-function EMA forgets its start: kept for the interface."""
        self._initial_net = net_weights

    # ------------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        register = getattr(pl_module, "use_average", None)
        if register is not None:
            register(None)  # the copies made below must not hold a reference to this callback
        if stage == "fit":
            others = [c for c in trainer.callbacks if isinstance(c, (WeightAverage, WeightAveraging))]
            if len(others) > 1:
                names = ", ".join(type(c).__name__ for c in others)
                raise ValueError(f"one weight average per run, got {names}: list one of them in trainer.callbacks")
            device = trainer.strategy.root_device
            self._averages = [deepcopy(pl_module).to(device).requires_grad_(False) for _ in self.sigma_rels]
            self._pairs = None
            for average in self._averages:
                if self._initial_net is not None:
                    average.net.load_state_dict(self._initial_net)
            self._initial_net = None
        if register is not None:
            register(self)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # a host int: optimizer steps so far
        if step <= self.step or self._averages is None:
            return  # gradient accumulation: no optimizer step since the last update
        self.update(pl_module, step)
        if step % self.snapshot_every == 0:
            self.write_snapshot(trainer, pl_module)

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule, step: int) -> None:
        """Every profile after optimizer step ``step`` (EDM2 Eq. 3): theta_hat += (1 - beta_t) (theta - theta_hat)."""
        if self._pairs is None:
            current = list(pl_module.net.parameters())
            self._pairs = [(list(average.net.parameters()), current) for average in self._averages]
        for (average, current), gamma in zip(self._pairs, self.gammas, strict=True):
            compat.foreach_lerp_(average, current, 1.0 - power_beta(step, gamma))
        self.step = step

    def snapshot_folder(self, trainer: L.Trainer) -> Path:
        """Where the snapshots go: ``folder`` or ``<trainer.default_root_dir>/posthoc_ema``."""
        return Path(self.folder) if self.folder is not None else Path(trainer.default_root_dir) / "posthoc_ema"

    @rank_zero_only
    def write_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """``<folder>/<step>.pt``: every profile's network at this step in ``snapshot_dtype``; rank 0 alone writes it
        (the other ranks get None)."""
        dtype = SNAPSHOT_DTYPES[self.snapshot_dtype]
        snapshot = {
            "step": self.step,
            "sigma_rels": list(self.sigma_rels),
            "gammas": list(self.gammas),
            "nets": [
                {
                    k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                    for k, v in a.net.state_dict().items()
                }
                for a in self._averages
            ],
            "hyper_parameters": dict(pl_module.hparams),
            "diffusion": {k: v.detach().cpu() for k, v in pl_module.state_dict().items() if k.startswith("diffusion.")},
        }
        path = self.snapshot_folder(trainer) / f"{self.step:010d}.pt"
        return atomic_write(path, lambda tmp: torch.save(snapshot, tmp))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap(pl_module)

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the network's weights with the sampling profile's (validation uses the average)."""
        average = self.average_module()
        if average is None or pl_module.trainer.state.fn != "fit":
            return
        for mine, theirs in zip(average.net.parameters(), pl_module.net.parameters(), strict=True):
            held = mine.detach().clone()
            mine.copy_(theirs)
            theirs.copy_(held)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._averages is None:
            return {}
        return {
            "step": self.step,
            "sigma_rels": list(self.sigma_rels),
            "profiles": [{k: v.detach().clone() for k, v in a.net.state_dict().items()} for a in self._averages],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        stored = tuple(state_dict["sigma_rels"])
        if stored != self.sigma_rels:
            raise ValueError(
                f"the checkpoint's post-hoc EMA tracks sigma_rels {list(stored)}, this run {list(self.sigma_rels)}: "
                "resume with the same sigma_rels (the profiles cannot change in a run)"
            )
        self.step = int(state_dict["step"])
        for average, profile in zip(self._averages or [], state_dict["profiles"], strict=False):
            average.net.load_state_dict(profile)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        average = self.average_module()
        if average is None:
            return
        # the layout of Lightning's WeightAveraging: the average in state_dict, the raw weights beside it
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {
            **{k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("net.")},
            **{f"net.{k}": v for k, v in average.net.state_dict().items()},
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._averages is None:
            return
        if "current_model_state" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])  # state_dict held the average
        # the profiles start from the checkpoint's average; load_state_dict, called next, restores this callback's own
        net = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        for average in self._averages:
            average.net.load_state_dict(net)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a last snapshot of the final weights, unless the interval just wrote one
        if self._averages is not None and self.step % self.snapshot_every != 0:
            self.write_snapshot(trainer, pl_module)
