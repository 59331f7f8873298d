"""``DiffusionModule``: an injected noise-prediction network, the diffusion maths, the training step, the loss, the
optimizer and Lightning's hooks; its sampling methods are :class:`~ddpm_lightning.generation.Sampling`'s.

The network is any ``nn.Module`` called as ``net(x_t, t)`` that returns a tensor shaped like ``x_t`` (the paper's
U-Net when none is given); a class-conditional one (``num_classes``) is called as ``net(x_t, t, y=labels)``.
Callbacks (EMA, resilience, tracking, sampling, FID) live in :mod:`ddpm_lightning.callbacks` and are added by the
CLI, visibly in its config, or by :func:`ddpm_lightning.callbacks.default_callbacks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from ddpm_lightning import choices, compat
from ddpm_lightning.checkpoint import check_state_dict_shapes, read_checkpoint
from ddpm_lightning.conditioning import batch_labels, bind_labels, drop_labels, label_kwargs
from ddpm_lightning.data.base import images_of
from ddpm_lightning.diffusion import GaussianDiffusion, Sampler, SamplerConfig
from ddpm_lightning.diffusion.assignment import assign_noise
from ddpm_lightning.diffusion.gaussian import LossType, LossWeighting, Objective, Variance
from ddpm_lightning.diffusion.schedules import NoiseSchedule, ScheduleName
from ddpm_lightning.diffusion.timesteps import TimestepSampling, TimestepSamplingConfig
from ddpm_lightning.diffusion.weighting import LearnedLossWeight, LossWeightingConfig
from ddpm_lightning.generation import Sampling
from ddpm_lightning.guard import NonFiniteGuard, NonFiniteLossError, NonFiniteSteps
from ddpm_lightning.legacy import upgrade_hyperparameters, upgrade_net_spec, upgrade_state_dict
from ddpm_lightning.models.build import (
    check_data_shape,
    check_output_shape,
    make_net,
    net_spec,
    resolve_image_shape,
    resolve_num_classes,
)
from ddpm_lightning.optim import AdamConfig, LRSchedule, LRScheduleName, RuntimeConfig, apply_settings, configure_adam

__all__ = ["DiffusionModule", "NonFiniteLossError", "NonFiniteSteps"]

PAPER_SAMPLER = SamplerConfig()  # the full ancestral chain
ADAM, RUNTIME = AdamConfig(), RuntimeConfig()  # Adam's defaults; fp32 eager channels-last, stop on a NaN/inf loss
NoiseAssignment = Literal[choices.NOISE_ASSIGNMENTS]  # type: ignore[valid-type]


class DiffusionModule(Sampling, L.LightningModule):
    """A DDPM: an injected noise-prediction network trained with L_simple, sampled with the EMA weights.

    The defaults are Ho et al. 2020's CIFAR-10 setup: the 35.7M U-Net, T=1000 linear betas 1e-4..0.02, eps
    prediction, fixed-large variance, Adam 2e-4 with 5000 warm-up steps and an EMA of 0.9999 (gradient clipping at
    1.0 is a Trainer setting, ``gradient_clip_val``).

    Args:
        net: the network, ``net(x_t, t) -> tensor shaped like x_t``; in YAML a ``class_path``/``init_args`` under
            ``model.net`` (presets in ``configs/model/``). None: the paper's :class:`UNet` for ``image_size`` and
            ``in_channels`` (defaults 32 and 3).
        image_size, in_channels: the image shape (C, H, W) = (in_channels, image_size, image_size): x_T is drawn in
            it and the data are checked against it (:meth:`setup`, an error naming both). None: the network's own
            ``image_size``/``in_channels`` attributes; ``ddpm fit`` fills in what neither gives from the data module
            (``ddpm_lightning.cli.fit.shape_from_data``), so a config writes the shape once, in ``data``. Given with
            a U-Net, they set its shape. A dummy forward at construction checks the network's output.
        schedule: the noise schedule (:class:`NoiseSchedule`), a name or a mapping such as
            ``{name: linear, beta_start: 1.0e-4, beta_end: 0.02}``.
        num_timesteps: T, the steps of the diffusion.
        variance, objective: see :class:`GaussianDiffusion`. A learned variance (``"learned_range"``,
            ``"learned"``) needs a network with twice the image channels (the default U-Net is built so, and a U-Net
            without ``out_channels`` gets them) and trains with L_hybrid.
        loss_weighting: the weighting of L_simple (:class:`LossWeightingConfig`), ``"none"`` (the paper),
            ``"min_snr"`` (min-SNR-gamma, Hang et al. 2023, e.g. ``{name: min_snr, gamma: 5.0}``; see
            :class:`GaussianDiffusion`) or ``"learned"``: EDM2's uncertainty weighting L_t / exp(u(t)) + u(t) with u a
            learned head on the noise level (:class:`~ddpm_lightning.diffusion.weighting.LearnedLossWeight`, the
            module's ``loss_weight``; drawn by :class:`~ddpm_lightning.callbacks.LossWeightCurve`).
        loss_type: ``"simple"`` (L_simple, or L_hybrid with a learned variance) or ``"vlb"`` (the bound alone);
            see :class:`GaussianDiffusion`.
        timestep_sampling: how t is drawn (:class:`TimestepSamplingConfig`), a name or a mapping such as
            ``{name: logit_normal, loc: 0.0, scale: 1.0}``: ``"uniform"`` t ~ Uniform{0..T-1} (the paper);
            ``"logit_normal"`` (SD3) or ``"laplace"`` on the log-SNR (Hang et al. 2024), whose p_t is the loss
            weighting (weights 1; ``unbiased: true`` weights by 1 / (T p_t)); or ``"loss_second_moment"``: importance
            sampling by sqrt(E[L_t^2]) over the last 10 losses at each t with weights 1 / (T p_t) (improved DDPM
            Sec. 3.3, meant for ``loss_type="vlb"``), whose history is gathered from every process (the same on all
            ranks) and checkpointed. Every process draws its own t (its own seed) from the same p_t.
        lr: Adam's learning rate, over every trainable parameter of the module (the EMA is a callback:
            ``ddpm_lightning.callbacks.EMA``).
        lr_schedule: its linear warm-up (``warmup_steps``, default 5000) and what follows
            (:class:`~ddpm_lightning.optim.LRSchedule`): ``"constant"`` (the paper), ``"linear"`` or ``"cosine"``
            decay to a floor, ``"wsd"`` (warm-up, stable, decay over the last ``decay_fraction``), e.g.
            ``{name: cosine, warmup_steps: 1000, min_lr_ratio: 0.1}``; a decay runs over ``trainer.max_steps`` unless
            it sets ``total_steps``.
        optimizer: Adam's other settings (:class:`~ddpm_lightning.optim.AdamConfig`), ``{betas: [0.9, 0.999],
            weight_decay: 0.0}``.
        sampler: the default :class:`SamplerConfig` of :meth:`sample` and of the commands, e.g.
            ``{name: ddim, steps: 50}``; a bare name means that sampler on all T steps. A class-conditional model
            may set its ``guidance_scale``.
        runtime: how the steps run (:class:`~ddpm_lightning.optim.RuntimeConfig`): ``compile``, ``channels_last``
            (on), ``matmul_precision`` and ``nonfinite_loss`` (``"stop"``: a NaN/inf loss ends the run at the next
            logging step; ``"skip"``: its step is skipped and the run carries on), e.g. ``{compile: true}``.
        num_classes: None: unconditional (the paper). K: class-conditional on labels 0..K-1 (the data's), with the
            null class K for classifier-free guidance (Ho & Salimans 2021); the network must accept ``y``. None also
            takes the network's own ``num_classes`` attribute; a default U-Net (or a preset without it) gets it.
        p_uncond: label dropout of a conditional model: the share of training labels replaced by the null class,
            so that one network learns the conditional and the unconditional model (Ho & Salimans use 0.1 or 0.2).
        noise_assignment: ``"random"`` (the paper: each image its own draw) or ``"immiscible"``: the batch's noise
            draws assigned to its images by minimum total distance (Immiscible Diffusion, Li et al. 2024;
            :func:`~ddpm_lightning.diffusion.assignment.assign_noise`).

    The settings of earlier versions (``model.ch``, ``model.beta_end`` ...) are mapped onto these where configs and
    checkpoints are read (:func:`~ddpm_lightning.legacy.upgrade_hyperparameters`), not here.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        schedule: NoiseSchedule | ScheduleName = "linear",
        num_timesteps: int = 1000,
        variance: Variance = "fixed_large",
        objective: Objective = "eps",
        loss_weighting: LossWeightingConfig | LossWeighting = "none",
        loss_type: LossType = "simple",
        timestep_sampling: TimestepSamplingConfig | TimestepSampling = "uniform",
        lr: float = 2e-4,
        lr_schedule: LRSchedule | LRScheduleName = "constant",
        optimizer: AdamConfig = ADAM,
        sampler: SamplerConfig | Mapping[str, Any] | Sampler = "ddpm",  # PAPER_SAMPLER by name: the CLI re-validates it
        runtime: RuntimeConfig = RUNTIME,
        num_classes: int | None = None,
        p_uncond: float = 0.1,
        noise_assignment: NoiseAssignment = "random",
    ):
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the arguments, as given
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.runtime, self.adam = RuntimeConfig.parse(runtime), AdamConfig.parse(optimizer)
        self.guard = NonFiniteGuard(self.runtime.nonfinite_loss)
        timestep_config = TimestepSamplingConfig.parse(timestep_sampling)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1) (the share of labels made null), got {p_uncond}")
        if noise_assignment not in choices.NOISE_ASSIGNMENTS:
            allowed = ", ".join(choices.NOISE_ASSIGNMENTS)
            raise ValueError(f"unknown noise_assignment {noise_assignment!r}; allowed: {allowed}")
        self.schedule, weighting = NoiseSchedule.parse(schedule), LossWeightingConfig.parse(loss_weighting)
        self.diffusion = GaussianDiffusion(
            self.schedule.betas(num_timesteps),
            variance=variance,
            objective=objective,
            loss_weighting=weighting.name,
            min_snr_gamma=weighting.gamma,
            loss_type=loss_type,
        )
        self.timestep_sampler = timestep_config.build(self.diffusion.alphas_cumprod)
        if weighting.name == "learned":
            self.loss_weight = LearnedLossWeight(self.diffusion.alphas_cumprod)
        out_factor = self.diffusion.output_channels_factor
        self.net = make_net(upgrade_net_spec(net), image_size, in_channels, out_factor, num_classes)
        self.image_shape = resolve_image_shape(self.net, image_size, in_channels)
        self.num_classes = resolve_num_classes(self.net, num_classes)
        self.sampler_config = SamplerConfig.parse(sampler)
        self.sampler_config = self.sampler_config_for(self.sampler_config)  # checked now, not at the first sampling
        self.lr_schedule = LRSchedule.parse(lr_schedule)
        check_output_shape(self.net, self.image_shape, out_factor, variance, self.num_classes)
        if self.runtime.channels_last:
            # before any callback copies the module (EMA), so that the copies run in the same format
            self.net.to(memory_format=torch.channels_last)

        self._save_settings(settings, net, timestep_config, weighting)
        # checkpoints written before the network was injected name it `unet`: renamed on every load_state_dict
        self.register_load_state_dict_pre_hook(_upgrade_state_dict_hook)

    def _save_settings(
        self, settings: dict[str, Any], net: Any, timestep: TimestepSamplingConfig, weighting: LossWeightingConfig
    ) -> None:
        """Save the hyper-parameters once, in the canonical form: plain types that load with weights_only=True, the
        resolved shape and settings. A network given in YAML (LightningCLI) or as a mapping keeps its
        class_path/init_args as written (other classes do not say their arguments). No `_instantiator` key:
        load_from_checkpoint then calls DiffusionModule(**hparams), which rebuilds the network from its spec."""
        spec, given = net_spec(self.net), net if isinstance(net, Mapping) else compat.given_hyperparameters().get("net")
        if spec["init_args"] is None and isinstance(given, Mapping) and given.get("init_args") is not None:
            spec = {"class_path": given["class_path"], "init_args": dict(given["init_args"])}
        self.save_hyperparameters(
            {
                **settings,
                "net": spec,
                "image_size": self.image_shape[-1],
                "in_channels": self.image_shape[0],
                "num_classes": self.num_classes,
                "schedule": self.schedule.to_dict(),
                "loss_weighting": weighting.to_dict(),
                "timestep_sampling": timestep.to_setting(),
                "sampler": self.sampler_config.to_dict(),
                "lr_schedule": self.lr_schedule.to_dict(),
                "optimizer": self.adam.to_dict(),
                "runtime": self.runtime.to_dict(),
            }
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x_t, t, **label_kwargs(self.num_classes, y))

    def denoiser(self, net: nn.Module, y: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        """``net`` (this module's or its EMA copy's) as the diffusion's ``model(x_t, t)``, with the labels ``y`` bound
        for a conditional model."""
        return bind_labels(net, self.num_classes, y)

    def train_labels(self, batch: Any) -> torch.Tensor | None:
        """The labels of a training batch with label dropout (``p_uncond``); None for an unconditional model."""
        if self.num_classes is None:
            return None
        return drop_labels(batch_labels(batch, self.num_classes), self.num_classes, self.hparams.p_uncond)

    # -------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, **kwargs: Any) -> DiffusionModule:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint`` (``map_location``, ``weights_only``, settings to override ...), with
        the settings of a checkpoint of an earlier version mapped onto today's first
        (:func:`~ddpm_lightning.legacy.upgrade_hyperparameters`: flat U-Net and sampler aliases, U-Net settings
        recorded later), so that it builds the network it was trained with."""
        if kwargs.get("hparams_file") is None and isinstance(checkpoint_path, (str, os.PathLike)):
            stored = read_checkpoint(checkpoint_path, mmap=True).get("hyper_parameters") or {}
            kwargs = {**upgrade_hyperparameters(stored), **kwargs}
        return super().load_from_checkpoint(checkpoint_path, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skips"] = self.guard.skips
        if self.timestep_sampler is not None:
            checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_state_dict(checkpoint["state_dict"])
        source = str(self.trainer.ckpt_path) if compat.attached_trainer(self) is not None else "being loaded"
        check_state_dict_shapes(self, checkpoint["state_dict"], source)
        self.guard.load(checkpoint.get("nonfinite_skips", 0))
        if self.timestep_sampler is not None and "timestep_sampler" in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])

    # -------------------------------------------------------------------------------------------- the guard
    @property
    def nonfinite_skips(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far (reads a device counter: a sync)."""
        return self.guard.skips

    @property
    def last_loss(self) -> float | None:
        """The training loss as last read on the host (logging steps)."""
        return self.guard.last_loss

    def on_fit_start(self) -> None:
        self.guard.fit_start(self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.guard.before_optimizer_step(self, optimizer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        self.guard.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.guard.batch_end(self)

    def on_train_end(self) -> None:
        self.guard.check(self)

    # -------------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        # Lightning runs the callbacks' setup first, so the EMA copy made there stays eager: a deep copy of a compiled
        # module would call the original module's compiled forward, i.e. sample with the raw weights
        if self.runtime.compile and not compat.is_compiled(self.net):
            self.net.compile()
        if self.runtime.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.runtime.matmul_precision)
        if stage == "fit" and self.trainer.world_size > 1:
            # seed_everything gives every process the same seed; offset it so that the processes draw different
            # t and eps for their images (a resumed run then restores each process's own RNG state)
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        if compat.attached_trainer(self) is not None:
            check_data_shape(self.image_shape, getattr(self.trainer, "datamodule", None))

    def configure_optimizers(self) -> dict[str, Any]:
        adam, trainer = self.adam, compat.attached_trainer(self)
        return configure_adam(self.parameters(), self.net, self.hparams.lr, adam.betas, adam.weight_decay,
                              self.lr_schedule, trainer)  # fmt: skip

    def on_train_start(self) -> None:
        # a resumed run's settings, over those restored from its checkpoint
        apply_settings(self.trainer, self.hparams.lr, self.adam.betas, self.adam.weight_decay)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.guard.loss = loss.detach()
        # not prog_bar=True: Lightning would read it on every step (a host-device sync); see callbacks.ProgressBar
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=images_of(batch).shape[0])
        return loss

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of a batch: t, noise and label dropout drawn, weighted as the settings say."""
        x0 = images_of(batch)
        denoiser = self.denoiser(self.net, self.train_labels(batch))
        noise = None if self.hparams.noise_assignment == "random" else assign_noise(x0, torch.randn_like(x0))
        if self.timestep_sampler is None and not hasattr(self, "loss_weight"):
            return self.diffusion.training_loss(denoiser, x0, noise=noise)
        if self.timestep_sampler is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
            weights = torch.ones((), device=x0.device)
        else:
            t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device)
        losses = self.diffusion.training_loss(denoiser, x0, t=t, noise=noise, reduction="none")
        if self.timestep_sampler is not None and self.timestep_sampler.stateful:
            # every process adds every process's losses in rank order: the same history, the same p_t on all ranks
            self.timestep_sampler.update(self._gather(t), self._gather(losses.detach()))
        losses = losses * weights
        if hasattr(self, "loss_weight"):
            self.loss_weight.observe(losses, t)
            losses = self.loss_weight.weigh(losses, t)
        return losses.mean()

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every process, concatenated in rank order (this process's alone outside DDP)."""
        if compat.attached_trainer(self) is None or self.trainer.world_size == 1:
            return values
        return self.all_gather(values).reshape(-1)

    def _fixed_seed_loss(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, int]:
        """L_simple with t and eps drawn from a seed fixed per batch, so evaluation losses are comparable."""
        x0 = images_of(batch)
        y = None if self.num_classes is None else batch_labels(batch, self.num_classes)  # the true labels, none dropped
        generator = torch.Generator().manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device, x0.dtype)
        return self.diffusion.training_loss(self.denoiser(self.net, y), x0, t=t, noise=noise), x0.shape[0]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, n = self._fixed_seed_loss(batch, batch_idx)
        self.log("val/loss", loss, sync_dist=True, batch_size=n, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, n = self._fixed_seed_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)


def _upgrade_state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    upgrade_state_dict(state_dict, prefix)
