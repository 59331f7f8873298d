"""Train-step throughput of the paper's U-Net (35.7M) on this machine, per option; prints a table, writes JSON.

python benchmarks/train_step.py --batch-size 8 --repeats 3 --out results/bench_train_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ddpm_lightning.diffusion import GaussianDiffusion, make_betas
from ddpm_lightning.models import UNet

OPTIONS = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16 autocast": {"bf16": True},
    "torch.compile": {"compile": True},
}


def step_seconds(batch_size: int, repeats: int, channels_last: bool = False, bf16: bool = False, compile: bool = False):
    """Median seconds of one train step: noise, forward, L_simple, backward, Adam (after one warm-up step)."""
    torch.manual_seed(0)
    unet = UNet()
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    x0 = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        unet, x0 = unet.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
    if compile:
        unet.compile()
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_loss(unet, x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--out", type=Path, default=Path("results/bench_train_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"| option | s/step (batch {args.batch_size}) | images/s |\n|---|---|---|")
    for name in args.options:
        seconds = step_seconds(args.batch_size, args.repeats, **OPTIONS[name])
        rows.append({"option": name, "seconds_per_step": seconds, "images_per_second": args.batch_size / seconds})
        print(f"| {name} | {seconds:.2f} | {args.batch_size / seconds:.1f} |", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch_size": args.batch_size, "machine": machine, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
