"""Where a training step of a network spends its time: torch.profiler's operators, grouped into categories.

    python benchmarks/profile_step.py --model ours --batch-size 32 --variant channels_last

Prints the share of each category (convolutions, attention, normalisation, ...) and the top operators, and writes
``benchmarks/results/profile_<model>_<device>.json``. On a GPU it also counts host-device synchronisations.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import MODELS  # noqa: E402
from suite import make_bench, parse_variant, write_atomic  # noqa: E402

from ddpm_lightning.diffusion import GaussianDiffusion, make_betas  # noqa: E402

# operator name fragments -> category, first match wins
CATEGORIES = (
    ("convolution", ("conv", "mkldnn")),
    ("attention", ("attention", "bmm", "softmax", "baddbmm")),
    ("normalisation", ("group_norm", "rms", "layer_norm", "norm")),
    ("dropout", ("bernoulli", "dropout")),
    ("activation", ("silu", "gelu", "sigmoid")),
    ("optimizer", ("adam", "lerp", "addcdiv", "addcmul", "sqrt", "_foreach")),
    ("copies and layout", ("copy_", "cat", "clone", "contiguous", "permute", "upsample", "pad")),
    ("elementwise", ("add", "mul", "sub", "div", "where", "mse", "pow", "sum", "mean")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ours", choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variant", default="channels_last", type=parse_variant)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    diffusion = GaussianDiffusion(make_betas("linear", 1000)).to(device)
    bench = make_bench(args.model, args.variant, "train", args.batch_size, device)
    for _ in range(2 + ("compile" in args.variant)):
        bench.step(diffusion)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            bench.step(diffusion)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    shares: dict[str, float] = defaultdict(float)
    for event in events:
        shares[category(event.key)] += getattr(event, key) / total
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:15]
    # a host-device synchronisation shows up as a cudaStreamSynchronize/cudaDeviceSynchronize/cudaMemcpy call
    syncs = sum(e.count for e in prof.key_averages() if "Synchronize" in e.key or e.key == "cudaMemcpy")
    print(
        f"{args.model}, batch {args.batch_size}, {args.steps} steps on {device.type}: {total / 1e3 / args.steps:.0f} "
        "ms of operator time per step"
    )
    print("| category | share |\n|---|---|")
    for label, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {100 * share:.1f}% |")
    print("\n| operator | share | calls |\n|---|---|---|")
    for event in top:
        print(f"| {event.key} | {100 * getattr(event, key) / total:.1f}% | {event.count} |")
    if device.type == "cuda":
        print(f"\nhost-device synchronisations in {args.steps} steps (the timing's own sync included): {syncs}")
    report = {
        "command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ms_per_step": total / 1e3 / args.steps,
        "categories": dict(shares),
        "top_operators": [{"name": e.key, "share": getattr(e, key) / total, "calls": e.count} for e in top],
        "synchronisations": syncs if device.type == "cuda" else None,
    }
    out = args.out or Path(f"benchmarks/results/profile_{args.model}_{device.type}.json")
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
