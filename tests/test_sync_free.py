"""The training step runs without host-device transfers; non-finite gradients are skipped on the device.

A host-device synchronisation is an op that reads a device value on the host (``aten._local_scalar_dense``:
``.item()``, ``bool(t)``, ``float(t)``) or copies a host number to the device (``aten.lift_fresh``: ``torch.tensor(x)``,
what ``self.log(name, float)`` does). On a GPU either one stalls the launch queue; on the CPU the same ops show that
they would. The counter below sees them in every hook and callback of a real ``Trainer.fit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import EMA_DECAY, LOG_EVERY, TransfersPerStep, tiny, trainer
from lightning.pytorch.loggers import CSVLogger

from ddpm_lightning.callbacks import EMA, ProgressBar
from ddpm_lightning.lit_module import DiffusionModule


class NaNImages(DiffusionModule):
    """Feeds NaN images at one step on rank 0 only: that step's loss and (after DDP's all-reduce) gradients are NaN."""

    nan_step = 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.nan_step and self.global_rank == 0:
            batch = [batch[0] * float("nan"), *batch[1:]]
        return super().training_step(batch, batch_idx)


def images(n: int = 48, batch_size: int = 4) -> torch.utils.data.DataLoader:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch_size)


class WeightsAndAdam(L.Callback):
    """Copies of the network's weights and of Adam's state for its output layer after every step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        net = pl_module.net
        state = trainer.optimizers[0].state[net.conv_out.weight]
        snapshot = {name: p.detach().clone() for name, p in net.named_parameters()}
        snapshot |= {f"adam.{key}": value.clone() for key, value in state.items()}
        self.after[trainer.global_step] = snapshot


@pytest.mark.integration
def test_steps_between_logging_steps_make_no_host_device_transfer(tmp_path: Path) -> None:
    counter = TransfersPerStep()
    fit = trainer(tmp_path, 12, [counter], logger=CSVLogger(tmp_path))
    fit.fit(tiny(), images())

    per_step = counter.per_step()
    logging_steps = {s for s in per_step if (s + 1) % LOG_EVERY == 0}
    quiet = {s: n for s, n in per_step.items() if s and s not in logging_steps}
    assert len(quiet) == 8 and set(quiet.values()) == {0}, quiet  # EMA, NaN guard, clipping, progress bar, img/s
    # the logging steps do transfer (the logger reads its metrics), so the counter is seen to work
    assert all(per_step[s] > 0 for s in logging_steps), per_step
    # the progress bar still shows the loss, as read on the logging steps
    assert isinstance(fit.progress_bar_callback, ProgressBar)
    assert (
        fit.progress_bar_callback.get_metrics(fit, fit.lightning_module)["loss"]
        == f"{fit.lightning_module.last_loss:.4g}"
    )


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # bf16: clipping with fused Adam too
def test_nonfinite_gradients_leave_weights_and_adam_untouched(tmp_path: Path, precision: str) -> None:
    snapshots = WeightsAndAdam()
    module = tiny(NaNImages, runtime={"nonfinite_loss": "skip"})
    with pytest.warns(
        UserWarning, match="1 optimizer step skipped for non-finite gradients so far, the first at step 1"
    ):
        trainer(tmp_path, 4, [snapshots], logger=False, precision=precision).fit(module, images())

    before, skipped, after = (snapshots.after[step] for step in (1, 2, 3))
    for name in before:
        torch.testing.assert_close(skipped[name], before[name], rtol=0, atol=0, msg=name)
    assert skipped["adam.step"] == 1  # the fused update did not count the skipped step
    assert not torch.equal(after["conv_out.weight"], skipped["conv_out.weight"])
    assert all(torch.isfinite(p).all() for p in after.values())
    assert module.nonfinite_skips == 1


@pytest.mark.unit
@pytest.mark.parametrize(("algorithm", "clip"), [("norm", 1.0), ("norm", 100.0), ("value", 0.01)])
def test_gradient_clipping_matches_the_float64_formula(algorithm: str, clip: float) -> None:
    """norm: g * min(1, c / (||g|| + 1e-6)) over all gradients together (clip_grad_norm_); value: clamp to [-c, c]."""
    module = tiny()
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))
    params = list(module.net.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 0.1
    grads = [p.grad.double().clone() for p in params]
    total = torch.sqrt(sum((g**2).sum() for g in grads))
    module.guard.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    module.configure_gradient_clipping(None, clip, algorithm)
    for p, g in zip(params, grads, strict=True):
        expected = g.clamp(-clip, clip) if algorithm == "value" else g * min(1.0, clip / (float(total) + 1e-6))
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-8)
    assert algorithm == "value" or (clip < total) == (torch.nn.utils.get_total_norm([p.grad for p in params]) < total)


@pytest.mark.integration
def test_ema_follows_ho_et_al_from_the_initial_weights(tmp_path: Path) -> None:
    """average_k = decay * average_{k-1} + (1 - decay) * weights_k, average_0 = the initial weights (float64)."""
    snapshots = WeightsAndAdam()
    module = tiny()
    initial = {name: p.detach().double().clone() for name, p in module.net.named_parameters()}
    fit = trainer(tmp_path, 4, [snapshots], logger=False)
    fit.fit(module, images())

    decay = EMA_DECAY
    expected = initial
    for step in (1, 2, 3, 4):
        expected = {n: decay * e + (1 - decay) * snapshots.after[step][n].double() for n, e in expected.items()}
    (ema,) = [c for c in fit.callbacks if isinstance(c, EMA)]
    average = dict(ema.average_module().net.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(average[name].double(), value, rtol=0, atol=1e-6, msg=name)


class DumpRank(TransfersPerStep):
    """Spawned processes share no memory: each writes its final weights, skip count and transfers to a file."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        weights = torch.cat([p.detach().flatten() for p in pl_module.net.parameters()])
        out = {"weights": weights.tolist(), "skips": pl_module.nonfinite_skips, "per_step": self.per_step()}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.mark.ddp
def test_ddp_processes_skip_together_without_a_collective_or_sync_per_step(tmp_path: Path) -> None:
    fit = trainer(
        tmp_path, 12, [DumpRank(tmp_path)], logger=False, devices=2, strategy="ddp_spawn", enable_progress_bar=False
    )
    fit.fit(tiny(NaNImages, runtime={"nonfinite_loss": "skip"}), images(batch_size=2))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skips"] for r in ranks] == [1, 1]  # rank 1's own loss was finite: it skipped on the shared gradients
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert all(abs(w) < float("inf") for w in ranks[0]["weights"])
    for rank in ranks:  # no SIGTERM broadcast, stop vote or NaN vote between the logging steps
        quiet = {s: n for s, n in rank["per_step"].items() if int(s) and (int(s) + 1) % LOG_EVERY}
        assert len(quiet) == 8 and set(quiet.values()) == {0}, quiet
