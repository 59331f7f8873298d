"""An early checkpoint of a run, kept as the weaker model of autoguidance (Karras et al. 2024, "Guiding a diffusion
model with a bad version of itself"): :class:`GuideCheckpoint` keeps the run's own early checkpoint (no training of
its own), :class:`GuideTraining` trains a smaller network for a fraction of the run beside it."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ddpm_lightning.callbacks.resilience import last_checkpoint_path
from ddpm_lightning.io import atomic_write
from ddpm_lightning.optim import DECAYING

__all__ = ["GuideCheckpoint", "GuideTraining"]


class GuideCheckpoint(Callback):
    """Write one checkpoint once ``at_fraction`` of ``trainer.max_steps`` optimizer steps are done (the paper's guides
    were trained for a fraction of the main model's run), or ``at_step`` steps, next to ``last.ckpt`` as ``filename``.
    With both, ``at_fraction`` applies to a run with ``max_steps`` and ``at_step`` to one bounded by time only.

    Use it with ``ddpm sample --guide-ckpt runs/NAME/checkpoints/guide.ckpt --autoguidance-scale 2``. Like every
    checkpoint it holds the EMA weights in its ``state_dict``, which sampling uses."""

    def __init__(self, at_step: int | None = None, at_fraction: float | None = None, filename: str = "guide.ckpt"):
        if at_step is None and at_fraction is None:
            raise ValueError("give at_step, at_fraction or both (at_step then serves runs without max_steps)")
        if at_step is not None and not (isinstance(at_step, int) and at_step >= 1):
            raise ValueError(f"at_step must be a positive number of optimizer steps, got {at_step!r}")
        if at_fraction is not None and not 0 < at_fraction < 1:
            raise ValueError(f"at_fraction must lie in (0, 1) (a share of trainer.max_steps), got {at_fraction}")
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"filename must be a file name ending in .ckpt, got {filename!r}")
        self.at_step = at_step
        self.at_fraction = at_fraction
        self.filename = filename

    def step(self, trainer: L.Trainer) -> int:
        """The optimizer step after which the guide is written."""
        has_length = trainer.max_steps is not None and trainer.max_steps >= 1
        if self.at_fraction is not None and has_length:
            return max(1, round(self.at_fraction * trainer.max_steps))
        if self.at_step is not None:
            return self.at_step
        raise ValueError(
            f"GuideCheckpoint(at_fraction={self.at_fraction}) needs trainer.max_steps; give at_step for a run "
            "bounded by max_time or epochs"
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step(trainer)  # a bad setting fails before the first step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step(trainer):
            # the weights and the EMA, as a ModelCheckpoint of the run would keep them (a loadable, resumable file)
            trainer.save_checkpoint(last_checkpoint_path(trainer).with_name(self.filename), weights_only=False)


class GuideTraining(Callback):
    """Train autoguidance's guide in the same fit: a *smaller* network trained for a *fraction* of the run with an EMA
    of its own (both reductions matter: Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself", Sec. 5), written as ``filename`` next to ``last.ckpt`` when its share of the steps is done.

    After each optimizer step of the main model the guide takes one step on the same batch, with the main model's
    loss settings, optimizer settings and learning-rate schedule (over its own steps), gradient clipping and, for a
    magnitude-preserving network, forced weight normalisation; in DDP its gradients are averaged over the processes,
    so every process keeps the same guide. Its cost counts in the run's time. Its state (weights, average,
    optimizer) is in the run's checkpoints, so a resumed run goes on training it.

    Args:
        width: the guide's base width as a share of the main network's (``ch`` of the U-Nets), in (0, 1]; rounded
            to a multiple of the U-Net's ``num_groups``.
        fraction: the share of the run's ``trainer.max_steps`` the guide trains for (EDM2's presets: 1/16 of the
            main run), in (0, 1]; ``at_step`` for a run without max_steps.
        ema_decay: the decay of the guide's own EMA, in [0, 1).
        at_step: the guide's step count when the run has no max_steps.
        filename: the checkpoint's file name.
    """

    def __init__(
        self,
        width: float = 0.5,
        fraction: float = 0.25,
        ema_decay: float = 0.95,
        at_step: int | None = None,
        filename: str = "guide.ckpt",
    ) -> None:
        if not 0 < width <= 1:
            raise ValueError(f"GuideTraining width must lie in (0, 1] (a share of the main network's), got {width}")
        if not 0 < fraction <= 1:
            raise ValueError(f"GuideTraining fraction must lie in (0, 1] (a share of max_steps), got {fraction}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"GuideTraining ema_decay must lie in [0, 1), got {ema_decay}")
        if at_step is not None and not (isinstance(at_step, int) and at_step >= 1):
            raise ValueError(f"GuideTraining at_step must be a positive number of optimizer steps, got {at_step!r}")
        if not filename.endswith(".ckpt") or "/" in filename:
            raise ValueError(f"filename must be a file name ending in .ckpt, got {filename!r}")
        self.width, self.fraction, self.ema_decay = width, fraction, ema_decay
        self.at_step, self.filename = at_step, filename
        self.guide: Any = None
        self._average: dict[str, torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._steps = 0
        self._done = False
        self._restored: dict[str, Any] | None = None

    def steps(self, trainer: L.Trainer) -> int | None:
        """The guide's number of optimizer steps; None while a step budget (``TrainingBudget``) has not fixed the
        run's length yet."""
        if trainer.max_steps is not None and trainer.max_steps >= 1:
            return max(1, round(self.fraction * trainer.max_steps))
        if self.at_step is not None:
            return self.at_step
        if any(getattr(c, "sets_max_steps", False) for c in trainer.callbacks):
            return None
        raise ValueError(
            f"GuideTraining(fraction={self.fraction}) needs trainer.max_steps (or a TrainingBudget); give at_step for "
            "a run bounded by max_time or epochs"
        )

    def guide_spec(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """The guide network's ``{class_path, init_args}``: the main network's with ``ch`` scaled by ``width``."""
        spec = dict(pl_module.hparams["net"])
        init_args = dict(spec.get("init_args") or {})
        if "ch" not in init_args:
            raise ValueError(
                f"GuideTraining scales the network's base width `ch`, but {spec.get('class_path')} has no such "
                "argument: use GuideCheckpoint, or a UNet/MPUNet"
            )
        groups = int(init_args.get("num_groups") or 1)
        init_args["ch"] = max(groups, round(init_args["ch"] * self.width / groups) * groups)
        return {"class_path": spec["class_path"], "init_args": init_args}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        hparams = {**pl_module.hparams, "net": self.guide_spec(pl_module)}
        with torch.random.fork_rng(devices=[]):  # the main run's random numbers stay as they are without a guide
            self.guide = type(pl_module)(**hparams).to(pl_module.device)
        hp = self.guide.hparams
        self._optimizer = torch.optim.Adam(self.guide.parameters(), lr=hp.lr, betas=self.guide.adam.betas)
        self._average = {k: v.detach().clone() for k, v in self.guide.net.state_dict().items()}
        self._steps, self._done = 0, False
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None

    @torch.enable_grad()
    def _train_step(self, trainer: L.Trainer, batch: Any) -> None:
        guide, optimizer, hp = self.guide, self.guide_optimizer, self.guide.hparams
        schedule, steps = guide.lr_schedule, self.steps(trainer)
        if steps is None and schedule.name in DECAYING and self._steps >= schedule.warmup_steps:
            factor = 1.0  # the run's length is not known yet: the schedule decays once it is
        else:
            total = None if steps is None else schedule.decay_steps(steps)
            factor = schedule.factor(self._steps, total)
        for group in optimizer.param_groups:
            group["lr"] = hp.lr * factor
        guide.train()
        loss = guide.batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in guide.parameters() if p.grad is not None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for grad in grads:
                torch.distributed.all_reduce(grad)
                grad.div_(torch.distributed.get_world_size())
        if trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(guide.parameters(), trainer.gradient_clip_val)
        optimizer.step()
        normalize = getattr(guide.net, "normalize_weights_", None)
        if callable(normalize):
            normalize()
        self._steps += 1
        with torch.no_grad():
            for name, value in guide.net.state_dict().items():
                if value.is_floating_point():
                    self._average[name].lerp_(value, 1.0 - self.ema_decay)

    @property
    def guide_optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "setup() builds the guide's optimizer"
        return self._optimizer

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._done or self.guide is None:
            return
        self._train_step(trainer, batch)
        steps = self.steps(trainer)
        if steps is not None and self._steps >= steps:
            self._write(trainer)
            self._done = True

    def _write(self, trainer: L.Trainer) -> None:
        """The guide's checkpoint (its EMA weights, as every checkpoint of a run holds them), on global rank 0."""
        if not trainer.is_global_zero:
            return
        state = {f"net.{k}": v.detach().cpu() for k, v in self._average.items()}
        state.update({k: v.detach().cpu() for k, v in self.guide.state_dict().items() if not k.startswith("net.")})
        checkpoint = {
            "state_dict": state,
            "hyper_parameters": dict(self.guide.hparams),
            "pytorch-lightning_version": L.__version__,
            "global_step": self._steps,
            "epoch": 0,
        }
        path = last_checkpoint_path(trainer).with_name(self.filename)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def state_dict(self) -> dict[str, Any]:
        if self.guide is None:
            return {}
        return {
            "steps": self._steps,
            "done": self._done,
            "guide": {k: v.detach().cpu() for k, v in self.guide.state_dict().items()},
            "average": {k: v.detach().cpu() for k, v in self._average.items()},
            "optimizer": self.guide_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._restored = state_dict
            if self.guide is not None:
                self._load(state_dict)
                self._restored = None

    def _load(self, state: dict[str, Any]) -> None:
        device = next(self.guide.parameters()).device
        self.guide.load_state_dict(state["guide"])
        self._average = {k: v.to(device) for k, v in state["average"].items()}
        self.guide_optimizer.load_state_dict(state["optimizer"])
        self._steps, self._done = int(state["steps"]), bool(state["done"])
