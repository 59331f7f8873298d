"""Host-side work around the U-Net in a training step: the EMA update, the non-finite guard and a whole Trainer step.

    python benchmarks/hot_path.py                      # this machine's default device
    python benchmarks/hot_path.py --device cuda --batch-size 128

Each piece is timed in its old form (what Lightning or a plain loop does) and in ours, side by side in one run, on
the paper's 35.7M-parameter U-Net. Besides the median time the table counts, per call, the dispatched operators (on
a GPU each is at least one kernel launch) and the host-device transfers: ``aten._local_scalar_dense`` (``.item()``,
``bool(t)``) and ``aten.lift_fresh`` (``torch.tensor(x)``). On a GPU each transfer waits for the queued work, so the
host cannot run ahead of the device. The last rows time a plain training step against ``Trainer.fit`` with
``DiffusionModule``'s defaults (EMA, guard, gradient clipping, logging every ``--log-every`` steps), and count the
transfers of the steps between logging steps and of the logging steps in a separate fit (counting slows the host).

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import _header, _row, hardware, versions  # noqa: E402

from ddpm_lightning.callbacks import default_callbacks  # noqa: E402
from ddpm_lightning.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_lightning.lit_module import (
    DiffusionModule,  # noqa: E402
    NonFiniteSteps,  # noqa: E402
)

HOST_TRANSFERS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)


class OpCounter(TorchDispatchMode):
    """Counts dispatched operators and host-device transfers."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.transfers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.transfers += func in HOST_TRANSFERS
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    """Median milliseconds per call (device work included), operators and transfers per call."""
    fn()
    counter = OpCounter()
    with counter:
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1e3, "ops": counter.ops, "transfers": counter.transfers}


def ema_rows(module: DiffusionModule, device: torch.device, repeats: int) -> dict[str, dict]:
    """Lightning's EMAWeightAveraging update (AveragedModel with avg_fn) against one foreach lerp."""
    averaged = AveragedModel(module, device=device, use_buffers=True, avg_fn=get_ema_avg_fn(0.9999))
    averaged.update_parameters(module)  # the first call only copies
    average, current = list(copy.deepcopy(module).parameters()), list(module.parameters())
    with torch.no_grad():
        return {
            "EMA update: AveragedModel (Lightning EMAWeightAveraging)": measure(
                lambda: averaged.update_parameters(module), device, repeats
            ),
            "EMA update: one foreach lerp (ours)": measure(
                lambda: torch._foreach_lerp_(average, current, 1e-4), device, repeats
            ),
        }


def guard_rows(module: DiffusionModule, device: torch.device, repeats: int) -> dict[str, dict]:
    """Reading the loss on the host to skip a step against flagging non-finite gradients for fused Adam."""
    grads = [torch.randn_like(p) for p in module.parameters()]
    loss = torch.tensor(0.5, device=device)
    steps = NonFiniteSteps(device=device)
    return {
        "non-finite guard: loss read on the host": measure(lambda: bool(torch.isfinite(loss)), device, repeats),
        "non-finite guard: gradient norm flag on the device (ours)": measure(
            lambda: steps.update(grads, loss, 0), device, repeats
        ),
    }


class StepMarks(L.Callback):
    """Per step: the global step, the host transfers so far (with ``count``) and the time at the batch start."""

    def __init__(self, count: bool) -> None:
        self.counter = OpCounter() if count else None
        self.marks: list[tuple[int, int, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counter is not None:
            self.counter.__enter__()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        _sync(pl_module.device)
        transfers = self.counter.transfers if self.counter is not None else 0
        self.marks.append((trainer.global_step, transfers, time.perf_counter()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)

    def steps(self) -> list[tuple[int, int, float]]:
        """(step, transfers, seconds) of every step but the first (set-up) and the last (no next mark)."""
        pairs = zip(self.marks[1:], self.marks[2:], strict=False)
        return [(step, n1 - n0, t1 - t0) for (step, n0, t0), (_, n1, t1) in pairs]


def _fit(args: argparse.Namespace, device: torch.device, marks: StepMarks) -> None:
    torch.manual_seed(0)
    module = DiffusionModule(lr_schedule={"warmup_steps": 10})
    data = torch.randn(args.batch_size * args.steps, 3, 32, 32).clamp(-1, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(
            default_root_dir=folder, accelerator=device.type, devices=1, max_steps=args.steps,
            log_every_n_steps=args.log_every, gradient_clip_val=1.0, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=True,
            callbacks=[marks, *default_callbacks()],
            logger=L.pytorch.loggers.CSVLogger(folder),
        ).fit(module, loader)  # fmt: skip


def plain_step(
    diffusion: GaussianDiffusion,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    bf16: bool = False,
) -> None:
    """One training step without Lightning: L_simple (under bf16 autocast with ``bf16``, as Lightning's bf16-mixed),
    backward, clipping of the gradient norm at 1, the optimizer step (no EMA)."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion.training_loss(net, x0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_step_ms(args: argparse.Namespace, device: torch.device) -> float:
    """Median time of the same step without Lightning: L_simple, backward, clipping, fused Adam (no EMA)."""
    torch.manual_seed(0)
    module = DiffusionModule().to(device)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-4, fused=True)
    x0 = torch.randn(args.batch_size, 3, 32, 32, device=device).clamp(-1, 1)
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        plain_step(module.diffusion, module.net, optimizer, x0)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def trainer_rows(args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """The plain step against a Trainer step; host transfers of the steps between and on logging steps."""
    counted, timed = StepMarks(count=True), StepMarks(count=False)
    _fit(args, device, counted)
    _fit(args, device, timed)
    transfers: dict[str, list[int]] = {"between logging steps": [], "logging steps": []}
    for step, n, _ in counted.steps():
        transfers["logging steps" if (step + 1) % args.log_every == 0 else "between logging steps"].append(n)
    batch = f"batch {args.batch_size}"
    return {
        f"training step, plain loop ({batch}: loss, backward, clipping, fused Adam)": {
            "ms": plain_step_ms(args, device), "ops": None, "transfers": None,
        },
        f"training step, Trainer.fit with DiffusionModule ({batch}: + EMA, guard, logging)": {
            "ms": statistics.median(t for _, _, t in timed.steps()) * 1e3, "ops": None, "transfers": None,
        },
        **{
            f"Trainer step, {kind}": {"ms": None, "ops": None, "transfers": max(counts), "steps": len(counts)}
            for kind, counts in transfers.items()
        },
    }  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"# Hot path around the U-Net: {report['hardware']}",
        "",
        f"`{report['command']}` ({report['date']}; torch {report['versions']['torch']}, "
        f"lightning {report['versions']['lightning']})",
        "",
        *_header(["what", "ms per call", "operators per call", "host-device transfers per call"]),
    ]
    for name, row in report["rows"].items():
        ms, ops = ("-" if row[k] is None else format(row[k], spec) for k, spec in (("ms", ".2f"), ("ops", "d")))
        steps = f" (most in {row['steps']} steps)" if "steps" in row else ""
        transfers = "-" if row["transfers"] is None else f"{row['transfers']}{steps}"
        lines.append(_row([name, ms, ops, transfers]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the Trainer rows")
    parser.add_argument("--steps", type=int, default=12, help="steps of the Trainer rows")
    parser.add_argument("--log-every", type=int, default=5, help="log_every_n_steps of the Trainer rows")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/hot_path_<device>")
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        parser.error(f"--steps {args.steps} must be at least 2 x --log-every ({2 * args.log_every})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    module = DiffusionModule().to(device)

    report = {
        "command": "python benchmarks/hot_path.py " + shlex.join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(device, torch.get_num_threads()),
        "versions": versions(),
        "rows": {
            **ema_rows(module, device, args.repeats),
            **guard_rows(module, device, args.repeats),
            **trainer_rows(args, device),
        },
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"hot_path_{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
