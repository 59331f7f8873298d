"""Train-step throughput of the paper's U-Net (35.7M) per option, interleaved; prints a table and writes JSON.

    python benchmarks/train_step.py --batch-size 8 --repeats 5 --out benchmarks/results/train_step_cpu.json

Every option gets its own model and optimizer; after one warm-up step each (compilation included), the options take
turns step by step, so a change in the machine's load hits all of them alike. The table reports medians and the
ratio to fp32 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_lightning.diffusion import GaussianDiffusion, make_betas
from ddpm_lightning.models import UNet

OPTIONS = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16_autocast": {"bf16": True},
    "torch_compile": {"compile": True},
}


@dataclass
class Run:
    """One option's model, optimizer and batch."""

    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x0: torch.Tensor
    bf16: bool

    def step(self, diffusion: GaussianDiffusion, device: torch.device) -> float:
        """Seconds of one train step: noise, forward, L_simple, backward, Adam."""
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = diffusion.training_loss(self.unet, self.x0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def make_run(batch_size: int, device: torch.device, channels_last=False, bf16=False, compile=False) -> Run:
    torch.manual_seed(0)
    unet = UNet().to(device)
    x0 = torch.randn(batch_size, 3, 32, 32, device=device)
    if channels_last:
        unet, x0 = unet.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
    if compile:
        unet.compile()
    return Run(unet, torch.optim.Adam(unet.parameters(), lr=2e-4), x0, bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be positive")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    diffusion = GaussianDiffusion(make_betas("linear", 1000)).to(device)
    runs = {name: make_run(args.batch_size, device, **OPTIONS[name]) for name in args.options}
    for run in runs.values():  # warm-up: allocations, autotuning, compilation
        run.step(diffusion, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run.step(diffusion, device))

    base = statistics.median(times["fp32"]) if "fp32" in times else None
    rows = []
    print(f"| option | s/step (batch {args.batch_size}, median of {args.repeats}) | images/s | vs fp32 |")
    print("|---|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        ratio = base / seconds if base else None
        rows.append(
            {
                "option": name,
                "seconds_per_step": seconds,
                "images_per_second": args.batch_size / seconds,
                "speedup_vs_fp32": ratio,
                "all_seconds": values,
            }
        )
        print(f"| {name} | {seconds:.3f} | {args.batch_size / seconds:.1f} | {f'{ratio:.2f}x' if ratio else '-'} |")
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    report = {
        "command": "python benchmarks/train_step.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "batch_size": args.batch_size,
        "machine": machine,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
