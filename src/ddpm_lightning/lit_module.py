"""``DiffusionModule``: thin glue between the U-Net, the diffusion maths and Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ddpm_lightning.callbacks.ema import EMA
from ddpm_lightning.diffusion import GaussianDiffusion, Sampler, Spacing, make_betas, sampling_timesteps
from ddpm_lightning.models import UNet
from ddpm_lightning.tracking import ProgressBar
from ddpm_lightning.training import (
    FinalCheckpoint,
    GracefulStop,
    NonFiniteLossError,
    NonFiniteSteps,
    RNGStates,
    check_state_dict_shapes,
    is_check_step,
)


def _images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: datasets yield (image, label) pairs or bare images."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class DiffusionModule(L.LightningModule):
    """A DDPM: the noise-prediction U-Net trained with L_simple, sampled with the EMA weights.

    The defaults are Ho et al. 2020's CIFAR-10 setup: the 35.7M U-Net, T=1000 linear betas 1e-4..0.02, eps
    prediction, fixed-large variance, Adam 2e-4 with 5000 warm-up steps and an EMA of 0.9999 (gradient clipping at
    1.0 is a Trainer setting, ``gradient_clip_val``).

    Args:
        image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout: the :class:`UNet`.
        schedule, num_timesteps, beta_start, beta_end: the noise schedule (:func:`make_betas`).
        variance, objective: see :class:`GaussianDiffusion`.
        lr, warmup_steps, adam_betas, weight_decay: Adam with a linear learning-rate warm-up.
        ema_decay: decay of the weights' EMA; 0 turns the EMA off (sampling then uses the raw weights).
        sampler, sample_steps, eta, sample_spacing: defaults of :meth:`sample`: ``"ddpm"`` (ancestral), ``"ddim"`` or
            ``"dpmpp_2m"`` (DPM-Solver++), with ``sample_steps`` network evaluations (None: all T), DDIM's ``eta``
            and the spacing of the visited timesteps (``"uniform"`` or ``"quadratic"``).
        nonfinite_loss: a NaN/inf loss makes NaN/inf gradients, whose optimizer step is always skipped on the device
            (counted in ``train/nonfinite_skips``). ``"stop"`` then ends the run at the next logging step with an
            error naming the step; ``"skip"`` carries on. Checking on the device keeps the step free of host syncs.
        compile: ``torch.compile`` the U-Net for training (the EMA copy used for sampling stays eager).
        channels_last: keep the U-Net (and its EMA copy) in the channels-last memory format: 1.1x faster training
            on a CPU (``make bench``) and the layout tensor-core convolutions want on GPUs.
        matmul_precision: ``torch.set_float32_matmul_precision`` for the run (``"high"``: TF32); None keeps it.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        schedule: Literal["linear", "cosine"] = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        variance: Literal["fixed_large", "fixed_small"] = "fixed_large",
        objective: Literal["eps", "x0", "v"] = "eps",
        lr: float = 2e-4,
        warmup_steps: int = 5000,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        ema_decay: float = 0.9999,
        sampler: Sampler = "ddpm",
        sample_steps: int | None = None,
        eta: float = 0.0,
        sample_spacing: Spacing = "uniform",
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        compile: bool = False,
        channels_last: bool = True,
        matmul_precision: Literal["highest", "high", "medium"] | None = None,
    ):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"unknown nonfinite_loss {nonfinite_loss!r}; allowed: stop, skip")
        self.save_hyperparameters()
        self.unet = UNet(
            in_channels=in_channels,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            dropout=dropout,
            image_size=image_size,
        )
        if channels_last:
            # before any callback copies the module (EMA), so that the copies run in the same format
            self.unet.to(memory_format=torch.channels_last)
        betas = make_betas(schedule, num_timesteps, beta_start=beta_start, beta_end=beta_end)
        self.diffusion = GaussianDiffusion(betas, variance=variance, objective=objective)
        # fail at construction, not at the first sampling callback
        sampling_timesteps(num_timesteps, sampler, sample_steps, sample_spacing)
        self._nonfinite = NonFiniteSteps()
        self._loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._skips_reported = 0
        self.last_loss: float | None = None  # the training loss as last read on the host (logging steps)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t)

    # -------------------------------------------------------------------------------------------- training
    def configure_callbacks(self) -> list[Callback]:
        ema = [EMA(self.hparams.ema_decay)] if self.hparams.ema_decay > 0 else []
        bar = self.trainer.progress_bar_callback
        # a plain TQDM bar would read a prog_bar metric on every step; this one shows last_loss
        progress = [ProgressBar.replacing(bar)] if type(bar) is TQDMProgressBar else []
        return [*ema, RNGStates(), GracefulStop(), FinalCheckpoint(), *progress]

    @property
    def nonfinite_skips(self) -> int:
        """Optimizer steps skipped for non-finite gradients so far (reads a device counter: a sync)."""
        return int(self._nonfinite.count)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = str(self.trainer.ckpt_path) if self._trainer is not None else "being loaded"
        check_state_dict_shapes(self, checkpoint["state_dict"], source)
        self._nonfinite = NonFiniteSteps(checkpoint.get("nonfinite_skips", 0))

    def setup(self, stage: str) -> None:
        # Lightning runs the callbacks' setup first, so the EMA copy made there stays eager: a deep copy of a compiled
        # module would call the original module's compiled forward, i.e. sample with the raw weights
        if self.hparams.compile and self.unet._compiled_call_impl is None:
            self.unet.compile()
        if self.hparams.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        if stage == "fit" and self.trainer.world_size > 1:
            # seed_everything gives every process the same seed; offset it so that the processes draw different
            # t and eps for their images (a resumed run then restores each process's own RNG state)
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
        hp = self.hparams
        if (size is not None and size != hp.image_size) or (channels is not None and channels != hp.in_channels):
            raise ValueError(
                f"the data ({type(datamodule).__name__}) has {channels}x{size}x{size} images but the model expects "
                f"{hp.in_channels}x{hp.image_size}x{hp.image_size}: set model.image_size={size} and "
                f"model.in_channels={channels}, or change the data"
            )

    def on_fit_start(self) -> None:
        self._skips_reported = self.nonfinite_skips
        self._nonfinite = NonFiniteSteps(self._skips_reported, self.device)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0 = _images(batch)
        loss = self.diffusion.training_loss(self.unet, x0)
        self._loss = loss.detach()
        # not prog_bar=True: Lightning would read it on every step (a host-device sync); see ProgressBar
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # float16 loss scaling skips non-finite steps itself (and expects some)
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        grad_norm, found_inf = self._nonfinite.update(grads, self._loss, self.global_step)
        self._grad_norm = grad_norm
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # fused optimizers read found_inf after the closure: 1.0 leaves weights and moments as they were
            optimizer.found_inf = found_inf
        elif found_inf.item():  # any other optimizer (a host sync): without gradients it updates nothing
            for p in self.unet.parameters():
                p.grad = None
        self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        self.log("train/nonfinite_skips", self._nonfinite.count.float(), on_step=True, on_epoch=False)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip the gradients (``trainer.gradient_clip_val``), by their total norm unless the algorithm is "value".

        Done here rather than by Lightning's precision plugin, which refuses to clip for fused Adam under mixed
        precision. The norm is the one the non-finite guard has just computed: no second pass over the gradients.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)  # fused Adam would unscale inside its step, after the clipping
        parameters = [p for p in self.unet.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(parameters, gradient_clip_val)
            return
        grad_norm = self._grad_norm if scaler is None else torch.nn.utils.get_total_norm([p.grad for p in parameters])
        torch.nn.utils.clip_grads_with_norm_(parameters, gradient_clip_val, grad_norm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for optimizer in self.trainer.optimizers:
            vars(optimizer).pop("found_inf", None)
        if is_check_step(self.trainer) or self.global_step == 1:
            self.last_loss = float(self._loss)
            self._check_nonfinite()

    def on_train_end(self) -> None:
        self._check_nonfinite()

    def _check_nonfinite(self) -> None:
        """Stop naming the first step whose gradients were not finite (``"stop"``), or warn (``"skip"``): a sync."""
        count, step, loss = self._nonfinite.read()
        if count == self._skips_reported:
            return
        if self.hparams.nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"the training loss is {loss} at step {step} and its gradients are not finite: that optimizer step "
                f"was skipped, {count} in all up to step {self.global_step}; check the data and the learning rate, "
                "or set model.nonfinite_loss=skip"
            )
        plural = "s" if count > 1 else ""
        rank_zero_warn(
            f"{count} optimizer step{plural} skipped for non-finite gradients so far, the first at step {step}"
        )
        self._skips_reported = count

    def _fixed_seed_loss(self, batch: Any, batch_idx: int) -> tuple[torch.Tensor, int]:
        """L_simple with t and eps drawn from a seed fixed per batch, so evaluation losses are comparable."""
        x0 = _images(batch)
        generator = torch.Generator().manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device, x0.dtype)
        return self.diffusion.training_loss(self.unet, x0, t=t, noise=noise), x0.shape[0]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, n = self._fixed_seed_loss(batch, batch_idx)
        self.log("val/loss", loss, sync_dist=True, batch_size=n, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, n = self._fixed_seed_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Samples for a batch of global sample indices; sample i is seeded by i."""
        indices = _images(batch)
        return self.sample(len(indices), seeds=[int(i) for i in indices])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.Adam(
            self.unet.parameters(), lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay, fused=True
        )
        warmup = hp.warmup_steps
        # linear warm-up of the learning rate, as in Ho et al.'s code: lr * min(step / warmup, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, 1.0) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -------------------------------------------------------------------------------------------- sampling
    def sampling_module(self) -> DiffusionModule:
        """The module whose weights sampling uses: the EMA copy during fit when there is one, else this one.

        Outside fit a checkpoint written with the EMA already holds the averaged weights in its ``state_dict``.
        """
        if self._trainer is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, EMA) and callback.average_module() is not None:
                    return callback.average_module()
        return self

    def sampling_settings(
        self,
        sampler: Sampler | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        spacing: Spacing | None = None,
    ) -> dict[str, Any]:
        """The sampler, number of steps (network evaluations), eta and spacing that :meth:`sample` uses.

        Unset values come from the hyper-parameters. ``sample_steps`` is the default step count of ``ddim`` and
        ``dpmpp_2m``, and of ``ddpm`` only when ``ddpm`` is the model's own sampler: the ancestral sampler asked for
        by name runs the full chain unless given ``num_steps``.
        """
        hp = self.hparams
        sampler = sampler or hp.sampler
        if num_steps is None and (sampler != "ddpm" or hp.sampler == "ddpm"):
            num_steps = hp.sample_steps
        spacing = spacing or hp.sample_spacing
        steps = len(sampling_timesteps(hp.num_timesteps, sampler, num_steps, spacing))
        return {"sampler": sampler, "num_steps": steps, "eta": hp.eta if eta is None else eta, "spacing": spacing}

    @torch.no_grad()
    def sample(
        self,
        num: int,
        *,
        seed: int | None = 0,
        seeds: Sequence[int] | None = None,
        sampler: Sampler | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        spacing: Spacing | None = None,
        return_steps: Sequence[int] | None = None,
        progress: bool = False,
        use_ema: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Generate ``num`` images in [-1, 1] with the EMA weights (fixed seed by default; ``seeds`` per sample).

        Unset sampler options are resolved by :meth:`sampling_settings`.
        """
        hp = self.hparams
        settings = self.sampling_settings(sampler, num_steps, eta, spacing)
        module = self.sampling_module() if use_ema else self
        was_training = module.training
        module.eval()
        try:
            return self.diffusion.sample(
                module.unet,
                (num, hp.in_channels, hp.image_size, hp.image_size),
                **settings,
                seed=None if seeds is not None else seed,
                seeds=seeds,
                return_steps=return_steps,
                device=self.device,
                progress=progress,
            )
        finally:
            module.train(was_training)
