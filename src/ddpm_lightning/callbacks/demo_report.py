"""The end of ``make demo``: checkpoint, samples, reverse chain, loss curve and classifier-based scores in one folder.

Scores come from :mod:`ddpm_lightning.evaluation.digit_classifier`, for three sets side by side: samples of the trained
model (EMA weights), samples of the untrained model (its initial weights, sampled the same way) and real held-out
digits. The held-out (val) digits are split in two halves: the first is the Frechet reference, the second is the
"real" row, so its distance shows the floor set by the finite sample size. A class-conditional model samples the
classes in turn (sample i has class i mod num_classes); its grid has one row per class and its scores add the share
of samples that the classifier reads as their requested class.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from ddpm_lightning import io
from ddpm_lightning.callbacks.guide import GuideCheckpoint, GuideTraining
from ddpm_lightning.callbacks.resilience import last_checkpoint_path
from ddpm_lightning.callbacks.sampling import render_samples
from ddpm_lightning.diffusion import Sampler, SamplerConfig
from ddpm_lightning.evaluation.digit_classifier import DigitScorer, requested_class_accuracy
from ddpm_lightning.sampling import class_rows, iter_samples, load_module

__all__ = ["DEMO_SAMPLER", "DemoReport"]

#: The report's default: 25 deterministic DDIM steps.
DEMO_SAMPLER = SamplerConfig("ddim", 25)


def _plot_loss(steps: list[int], losses: list[float], path: Path, title: str, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=0.6, alpha=0.35, color="tab:blue", label="train/loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window} steps")
    ax.set(xlabel="optimizer step", ylabel=f"L_simple (MSE of {target})", yscale="log", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


ETA_AFTER_STEPS = 20  # steps timed before the ETA line


class DemoReport(Callback):
    """At the end of fit, write to ``default_root_dir``: ``demo.ckpt``, ``samples.png`` (grid of ``num_samples``),
    ``chain.png`` (reverse chain x_T ... x_0), ``loss.png`` (the logged ``train/loss``) and ``metrics.json``, and
    print where they are. Needs :class:`~ddpm_lightning.data.EmbeddedDigitsDataModule`.

    The losses and the training time so far are kept in every checkpoint, so that the report of a resumed run covers
    the whole run (its steps, seconds and loss curve); its steps/s are those of the steps this process ran.

    Args:
        num_samples: images in ``samples.png``: the first of the evaluation samples.
        num_eval_samples: samples scored for each model (sample i seeded by ``seed + i``).
        chain_samples, chain_steps: rows and x_t columns of ``chain.png``.
        sampler: the sampler setting of every image of the report (default ``{name: ddim, steps: 25}``; a bare name
            runs 25 network evaluations of that sampler).
        seed: seed of the first sample.
        classifier_epochs: training epochs of the digit classifier (trained once, then cached).
        classifier_cache_dir: where the classifier is cached; default ``$XDG_CACHE_HOME/ddpm-lightning``.
        untrained_baseline: also score the untrained model (its initial weights, sampled the same way); an
            ablation turns it off to save the sampling time.
        guide_ckpt: autoguidance's weaker model, used with ``sampler.autoguidance_scale``: a checkpoint path, or a
            bare file name in the run's checkpoint folder, where :class:`~ddpm_lightning.callbacks.GuideCheckpoint`
            writes it during the run (e.g. ``guide.ckpt``).
        unguided_baseline: with a guide, also score the same samples unguided (``num_eval_samples`` more samples).
    """

    def __init__(
        self,
        num_samples: int = 64,
        num_eval_samples: int = 250,
        chain_samples: int = 8,
        chain_steps: int = 10,
        sampler: SamplerConfig | Mapping[str, Any] | Sampler = DEMO_SAMPLER,
        *,
        seed: int = 0,
        classifier_epochs: int = 6,
        classifier_cache_dir: str | None = None,
        untrained_baseline: bool = True,
        guide_ckpt: str | None = None,
        unguided_baseline: bool = True,
    ):
        if not 1 <= num_samples <= num_eval_samples:
            raise ValueError(
                f"need 1 <= num_samples <= num_eval_samples, got num_samples={num_samples}, "
                f"num_eval_samples={num_eval_samples}"
            )
        self.sampler = SamplerConfig.parse(sampler, DEMO_SAMPLER)
        if (self.sampler.autoguidance_scale != 1) != (guide_ckpt is not None):
            raise ValueError(
                f"DemoReport: sampler.autoguidance_scale={self.sampler.autoguidance_scale:g} and "
                f"guide_ckpt={guide_ckpt!r}: autoguidance needs both (a scale other than 1 and a guide checkpoint)"
            )
        self.guide_ckpt = guide_ckpt
        self.num_samples = num_samples
        self.num_eval_samples = num_eval_samples
        self.chain_samples = chain_samples
        self.chain_steps = chain_steps
        self.seed = seed
        self.classifier_epochs = classifier_epochs
        self.classifier_cache_dir = classifier_cache_dir
        self.untrained_baseline = untrained_baseline
        self.unguided_baseline = unguided_baseline
        self.losses: list[tuple[int, torch.Tensor]] = []  # kept on the device: read once, at the end
        self._initial_state: dict[str, torch.Tensor] | None = None
        self._train_start = self._train_time = 0.0
        self._progress = False  # bars in the report: where the run shows them (write_report)
        self._training = False
        self._first_step: int | None = None  # None: this process ran no step (a resume at max_steps)
        # the runs before a resume, from the checkpoint: their losses and training time
        self._earlier_losses: list[tuple[int, float]] = []
        self._earlier_time = 0.0

    # ------------------------------------------------------------------------------------------------ recording
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not hasattr(datamodule, "split_arrays"):
            raise ValueError(
                f"DemoReport scores digits and needs data.class_path: ddpm_lightning.data.EmbeddedDigitsDataModule, "
                f"got {type(datamodule).__name__}"
            )
        self.sampler.timesteps(pl_module.diffusion.num_timesteps)
        if self.guide_ckpt is not None:
            self._check_guide(trainer)
        if stage == "fit" and self.untrained_baseline:
            # the untrained baseline: the weights before the first step (and before a checkpoint is restored)
            self._initial_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def guide_path(self, trainer: L.Trainer) -> Path | None:
        """The guide checkpoint: ``guide_ckpt``, a bare file name taken in the run's checkpoint folder."""
        if self.guide_ckpt is None:
            return None
        path = Path(self.guide_ckpt)
        return last_checkpoint_path(trainer).with_name(path.name) if path.parent == Path() else path

    def _check_guide(self, trainer: L.Trainer) -> None:
        """Before the first step: the guide exists, or a GuideCheckpoint of this run will write it."""
        path = self.guide_path(trainer)
        writers = (GuideCheckpoint, GuideTraining)
        written = any(isinstance(c, writers) and c.filename == path.name for c in trainer.callbacks)
        if not path.is_file() and not (written and path.parent == last_checkpoint_path(trainer).parent):
            raise ValueError(
                f"DemoReport: the guide checkpoint {path} does not exist and no GuideCheckpoint or GuideTraining"
                f"(filename={path.name!r}) of this run writes it; add one (e.g. at_fraction: 0.3) or give an existing "
                "checkpoint"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._training = True
        self._first_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append((trainer.global_step, loss.detach()))
        if trainer.global_step == self._first_step + ETA_AFTER_STEPS and trainer.is_global_zero:
            tqdm.write(self._eta_line(trainer), file=sys.stdout)

    def _eta_line(self, trainer: L.Trainer) -> str:
        """The demo's first line: how long training will take on this machine, from the steps timed so far."""
        rate = ETA_AFTER_STEPS / (time.perf_counter() - self._train_start)
        if trainer.max_steps <= 0:
            return f"demo: {rate:.2f} optimizer steps/s on this machine; training stops at its time budget (max_time)"
        left = (trainer.max_steps - trainer.global_step) / rate
        return (
            f"demo: {trainer.max_steps} optimizer steps at {rate:.2f} steps/s on this machine: about "
            f"{int(left // 60)} min {int(left % 60):02d} s of training to go, then the report "
            "(the number of steps, trainer.max_steps, sets the quality; a slower machine takes longer)"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_time = time.perf_counter() - self._train_start
        self._training = False

    def _time_this_run(self) -> float:
        return time.perf_counter() - self._train_start if self._training else self._train_time

    def loss_history(self) -> list[tuple[int, float]]:
        """(step, train/loss) of the whole run: the runs before a resume, then this one."""
        values = torch.stack([v for _, v in self.losses]).tolist() if self.losses else []
        return [*self._earlier_losses, *zip([s for s, _ in self.losses], values, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.loss_history(), "train_time_s": self._earlier_time + self._time_this_run()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._earlier_losses = [(int(step), float(loss)) for step, loss in state_dict.get("losses", [])]
        self._earlier_time = float(state_dict.get("train_time_s", 0.0))

    # ------------------------------------------------------------------------------------------------ the report
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = Path(trainer.default_root_dir)
        ckpt = root / "demo.ckpt"
        # on every rank (it synchronises); the full state, so `ddpm fit --ckpt_path` can resume from it, with the EMA
        # weights in its state_dict (put there by the EMA callback)
        trainer.save_checkpoint(ckpt, weights_only=False)
        if trainer.is_global_zero:
            self.write_report(trainer, pl_module, root, ckpt)

    def write_report(self, trainer: L.Trainer, pl_module: L.LightningModule, root: Path, ckpt: Path) -> dict:
        """Write the images and ``metrics.json``, print a summary; returns the metrics."""
        # bars while the report works (a few minutes on a slow CPU), where the run shows one
        self._progress = trainer.progress_bar_callback is not None
        scorer = DigitScorer.from_digits(
            trainer.datamodule,
            epochs=self.classifier_epochs,
            cache_dir=self.classifier_cache_dir,
            progress=self._progress,
        )
        plain = dataclasses.replace(self.sampler, autoguidance_scale=1.0)
        guide_path = self.guide_path(trainer)
        if guide_path is not None and not guide_path.is_file():  # a run stopped before the guide's step
            print(f"demo: no guide at {guide_path} (the run stopped before its step): the samples are unguided")
            guide_path = None
        guide = None if guide_path is None else load_module(guide_path, pl_module.device)
        sampler = self.sampler if guide is not None else plain
        images = self._eval_samples(pl_module, guide, sampler, "demo: samples of the trained model")
        labels = self._write_images(pl_module, images, sampler, guide, root)
        untrained_images = self._untrained_images(pl_module, plain) if self.untrained_baseline else None

        steps = trainer.global_step
        ran = 0 if self._first_step is None else steps - self._first_step  # the steps this process ran
        train_time = self._earlier_time + self._train_time  # the whole run's, over its resumes
        history = self.loss_history()
        _plot_loss(
            [s for s, _ in history],
            [v for _, v in history],
            root / "loss.png",
            f"{steps} steps in {train_time / 60:.1f} min",
            pl_module.diffusion.objective,
        )
        unguided = {}
        if guide is not None and self.unguided_baseline:  # the same samples without autoguidance, beside the guided
            unguided = {"unguided": scorer(self._eval_samples(pl_module, None, plain, "demo: unguided samples"))}
        metrics = {
            "trained": scorer(images),
            **unguided,
            **({"untrained": scorer(untrained_images)} if untrained_images is not None else {}),
            "real_heldout": scorer(scorer.heldout),
            "max_class_entropy": math.log(10),
            "num_eval_samples": self.num_eval_samples,
            "num_real_reference": scorer.num_reference,
            "sampler": sampler.label(pl_module.diffusion.num_timesteps),
            **({"guide_ckpt": str(guide_path)} if guide_path is not None else {}),
            "steps": steps,
            "train_time_s": round(train_time, 1),
            "steps_this_run": ran,
            "steps_per_s": round(ran / self._train_time, 3) if ran > 0 and self._train_time > 0 else None,
            "device": str(pl_module.device),
            "torch_threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in pl_module.net.parameters()),
            "classifier": {"val_accuracy": scorer.accuracy, "epochs": self.classifier_epochs, "file": str(scorer.path)},
        }
        if labels is not None:
            metrics["trained"]["requested_class_accuracy"] = requested_class_accuracy(scorer.classifier, images, labels)
            if untrained_images is not None:
                metrics["untrained"]["requested_class_accuracy"] = requested_class_accuracy(
                    scorer.classifier, untrained_images, labels
                )
        io.write_json(metrics, root / "metrics.json")
        self._print_summary(root, ckpt, metrics)
        return metrics

    def _write_images(
        self, pl_module: L.LightningModule, images: torch.Tensor, sampler: SamplerConfig, guide: Any, root: Path
    ) -> torch.Tensor | None:
        """``samples.png`` (one row per class for a conditional model) and ``chain.png``; the samples' labels."""
        _, _, strip = render_samples(
            pl_module, self.chain_samples, self.chain_samples, self.chain_steps, sampler=sampler, seed=self.seed,
            guide=guide,
        )  # fmt: skip
        K = pl_module.num_classes
        labels = None if K is None else torch.arange(len(images)) % K  # iter_samples' classes: i mod K
        if labels is None:
            io.save_grid(images[: self.num_samples], root / "samples.png")
        else:
            per_row = max(1, self.num_samples // K)
            io.save_grid(class_rows(images, labels.tolist(), range(K), per_row), root / "samples.png", nrow=per_row)
        io.save_png(strip, root / "chain.png")
        return labels

    def _untrained_images(self, pl_module: L.LightningModule, plain: SamplerConfig) -> torch.Tensor:
        """The same module with the weights it had before the first step, sampled the same way (unguided)."""
        untrained = copy.deepcopy(pl_module)
        untrained.use_average(None)  # its own (initial) weights, not the run's average
        untrained.load_state_dict(self._initial_state)
        return self._eval_samples(untrained, None, plain, "demo: samples of the untrained model")

    def _eval_samples(
        self,
        module: L.LightningModule,
        guide: L.LightningModule | None = None,
        sampler: SamplerConfig | None = None,
        desc: str = "demo: samples",
    ) -> torch.Tensor:
        """The ``num_eval_samples`` scored samples of ``module`` in [-1, 1], on the CPU (autoguided by ``guide``), with
        a bar of the network evaluations named ``desc`` when the run shows bars."""
        sampler = self.sampler if sampler is None else sampler
        batches = iter_samples(
            module, range(self.num_eval_samples), sampler=sampler, seed=self.seed, guide=guide,
            progress=self._progress, desc=desc,
        )  # fmt: skip
        return torch.cat([images.cpu() for _, images in batches])

    @staticmethod
    def _print_summary(root: Path, ckpt: Path, metrics: dict) -> None:
        rate = "no step timed" if metrics["steps_per_s"] is None else f"{metrics['steps_per_s']} steps/s"
        ran = metrics.get("steps_this_run", metrics["steps"])
        if ran != metrics["steps"]:  # a resumed run: the rate is that of its own steps
            rate = f"{ran} in this run: {rate}"
        lines = [
            f"\ndemo: {metrics['steps']} steps in {metrics['train_time_s']:.0f} s "
            f"({rate} on {metrics['device']}, {metrics['torch_threads']} threads)",
            f"  checkpoint  {ckpt}",
            *(f"  {name:<11} {root / name}.{ext}" for name, ext in [("samples", "png"), ("chain", "png")]),
            f"  loss curve  {root / 'loss.png'}",
            f"  metrics     {root / 'metrics.json'}",
            f"  {'':<14}{'confident>0.9':>14}{'class entropy':>15}{'Frechet dist.':>15}",
        ]
        for name in [n for n in ("trained", "unguided", "untrained", "real_heldout") if n in metrics]:
            s = metrics[name]
            lines.append(
                f"  {name:<14}{s['confident_share']:>14.3f}{s['class_entropy']:>15.3f}{s['frechet_distance']:>15.2f}"
            )
        lines.append(f"  (class entropy is at most log 10 = {math.log(10):.3f}; {metrics['sampler']} sampling)")
        if "requested_class_accuracy" in metrics["trained"]:
            accuracy = metrics["trained"]["requested_class_accuracy"]
            lines.append(f"  samples classified as their requested class: {accuracy:.3f} (trained)")
        print("\n".join(lines), flush=True)
