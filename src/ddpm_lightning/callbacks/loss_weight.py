"""The learned loss weighting's curve, u(t) against the per-timestep loss, as a picture in the run folder and in the
dashboards."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ddpm_lightning.callbacks.periodic import EveryNSteps
from ddpm_lightning.callbacks.sampling import log_image
from ddpm_lightning.io import write_json
from ddpm_lightning.plots import figure_image, loss_weight_figure, save_figure

__all__ = ["LossWeightCurve"]


class LossWeightCurve(EveryNSteps):
    """Every ``every_n_steps`` optimizer steps and when fit ends, draw u(t) of ``model.loss_weighting: learned``
    beside the log of the running mean loss per timestep bin (u moves towards it): ``<run>/loss_weight.png`` and
    ``loss_weight.json`` (the numbers), and the image ``loss_weight/curve`` in TensorBoard and W&B; the mean of u is
    logged as ``train/loss_weight_u_mean``. Global rank 0 draws and writes.
    """

    def __init__(self, every_n_steps: int | None = 500, on_fit_end: bool = True) -> None:
        super().__init__(every_n_steps, on_fit_end)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "loss_weight", None) is None:
            raise ValueError(
                "LossWeightCurve draws the learned loss weighting, but this model has none: set "
                "model.loss_weighting=learned, or remove the callback"
            )

    def at_step(self, trainer: L.Trainer, pl_module: L.LightningModule, fit_end: bool) -> None:
        if not trainer.is_global_zero:
            return
        curve = pl_module.loss_weight.curve()
        step = trainer.global_step
        root = Path(trainer.default_root_dir)
        fig = loss_weight_figure(curve, step)
        image = figure_image(fig)
        save_figure(fig, root / "loss_weight.png")
        log_loss = [v if v == v else None for v in curve["log_loss"]]  # NaN (a bin not seen yet): null
        write_json({"step": step, **curve, "log_loss": log_loss}, root / "loss_weight.json")
        mean_u = sum(curve["u"]) / len(curve["u"])
        for logger in trainer.loggers:
            log_image(logger, "loss_weight/curve", image, step)
            logger.log_metrics({"train/loss_weight_u_mean": mean_u}, step=step)
