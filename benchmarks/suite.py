"""Speed, memory and FLOPs of the paper's U-Net against diffusers and denoising-diffusion-pytorch, side by side.

    make bench                                                      # all defaults for this machine
    python benchmarks/suite.py --batch-sizes 32 --variants fp32 channels_last --repeats 7

For every batch size, workload and variant the networks are built fresh, warmed up (compilation, autotuning), then
take turns round by round, so a change in the machine's load hits all of them alike; the table shows medians and
the ratios ours / peer from the same run.

- workloads: ``train`` = noise + forward + L_simple + backward + Adam step (our ``GaussianDiffusion.training_loss``
  and fused Adam for every network); ``sample`` = one network evaluation without gradients, in eval mode.
- variants: ``fp32``, ``channels_last``, ``bf16`` (autocast, fp32 weights: Lightning's bf16-mixed), ``compile``
  (``torch.compile``), and ``+`` combinations such as ``bf16+compile``.
- memory: peak of a training step in a fresh process per network (CPU: peak RSS minus the RSS before the network is
  built; GPU: max allocated), so weights, gradients, Adam state and activations all count.
- FLOPs: counted once per network with ``torch.utils.flop_counter`` (attention through the math kernel so that it
  is counted). The share of peak divides the FLOP rate by the rate of a large 3x3 convolution measured on the same
  device and precision (a CPU's turbo clock makes its nominal peak unreliable); the nominal peak is in the JSON.

Writes ``<out>.json`` (times, ratios, memory, FLOPs, hardware, versions, command) and ``<out>.md`` (the tables).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import MODELS, build  # noqa: E402

from ddpm_lightning.diffusion import GaussianDiffusion, make_betas  # noqa: E402

FLAGS = ("channels_last", "bf16", "compile")
WORKLOADS = ("train", "sample")
# dense peak TFLOP/s per precision (vendor data sheets, SXM parts)
GPU_PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def parse_variant(variant: str) -> frozenset[str]:
    """``"fp32"`` -> no flags; ``"bf16+compile"`` -> {bf16, compile}."""
    flags = frozenset() if variant == "fp32" else frozenset(variant.split("+"))
    unknown = flags - set(FLAGS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant flag(s) {sorted(unknown)} in {variant!r}; allowed: fp32 or "
            f"a '+'-joined combination of {', '.join(FLAGS)}"
        )
    return flags


# ---------------------------------------------------------------------------------------------------- one network
@dataclass
class Bench:
    """One network in one variant, with its optimizer and batch."""

    name: str
    net: torch.nn.Module
    flags: frozenset[str]
    workload: str
    x0: torch.Tensor
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)

    def step(self, diffusion: GaussianDiffusion) -> None:
        with torch.autocast(self.x0.device.type, dtype=torch.bfloat16, enabled="bf16" in self.flags):
            if self.workload == "sample":
                with torch.no_grad():
                    t = torch.randint(0, diffusion.num_timesteps, (self.x0.shape[0],), device=self.x0.device)
                    self.net(self.x0, t)
                return
            loss = diffusion.training_loss(self.net, self.x0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, diffusion: GaussianDiffusion, steps: int) -> None:
        sync = torch.cuda.synchronize if self.x0.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(diffusion)
        sync()
        self.times.append((time.perf_counter() - start) / steps)


def make_bench(name: str, flags: frozenset[str], workload: str, batch: int, device: torch.device) -> Bench:
    torch.manual_seed(0)
    net = build(name).to(device)
    x0 = torch.randn(batch, 3, 32, 32, device=device)
    if "channels_last" in flags:
        net, x0 = net.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
    optimizer = None
    if workload == "train":
        net.train()
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)
    else:
        net.eval()
    if "compile" in flags:
        net.compile()
    return Bench(name, net, flags, workload, x0, optimizer)


# ------------------------------------------------------------------------------------------------------- FLOPs
def count_flops(name: str, device: torch.device) -> dict[str, float]:
    """FLOPs per image of one forward pass and of one training step (forward + backward), at batch 2."""
    return net_flops(build(name).to(device), 32)


def net_flops(net: torch.nn.Module, image_size: int) -> dict[str, float]:
    """FLOPs per 3-channel ``image_size`` image of ``net``'s forward pass and training step, at batch 2."""
    device = next(net.parameters()).device
    x = torch.randn(2, 3, image_size, image_size, device=device)
    t = torch.tensor([10, 500], device=device)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.eval()(x, t)
        forward = counter.get_total_flops() / 2
        with FlopCounterMode(display=False) as counter:
            net.train()(x, t).square().mean().backward()
        train = counter.get_total_flops() / 2
    return {"params": sum(p.numel() for p in net.parameters()), "forward": forward, "train": train}


def peak_flops(device: torch.device, threads: int) -> dict[str, float | None]:
    """Nominal peak FLOP/s per precision: GPU data sheets, or cores x clock x FMA lanes on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return {k: v * 1e12 for k, v in peaks.items()}
        return {"fp32": None, "tf32": None, "bf16": None}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(line.split(":")[1]) for line in flags.splitlines() if line.startswith("cpu MHz")]
    if not mhz:
        return {"fp32": None, "bf16": None}
    # two FMA pipes per core: 2 x (512 or 256 bits / 32) lanes x 2 FLOPs
    per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags else None
    fp32 = threads * mhz[0] * 1e6 * per_cycle if per_cycle else None
    bf16 = 2 * fp32 if fp32 and " avx512_bf16" in flags and " amx_bf16" not in flags else None
    return {"fp32": fp32, "bf16": bf16}


def conv_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of 3 large 3x3 convolutions (256 channels, 32x32, batch 32, channels_last): the rate the
    convolution library attains on this device, the U-Net's own bottleneck (a CPU's turbo clock makes its nominal
    peak unreliable, and a BLAS matrix product may not use the widest vector units)."""
    batch = 128 if device.type == "cuda" else 32
    x = torch.randn(batch, 256, 32, 32, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    best = float("inf")
    with torch.no_grad():
        for _ in range(4):  # the first is a warm-up
            sync()
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            sync()
            best = min(best, time.perf_counter() - start)
    return 2 * batch * 256 * 256 * 9 * 32 * 32 / best


# ------------------------------------------------------------------------------------------------------ memory
def _vm(field_name: str) -> float:
    """A /proc/self/status field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def probe_memory(name: str, flags: frozenset[str], batch: int, device: torch.device) -> float:
    """Peak MiB of two training steps of one network in this (fresh) process."""
    diffusion = GaussianDiffusion(make_betas("linear", 1000)).to(device)
    before = _vm("VmRSS") if device.type == "cpu" else 0.0
    bench = make_bench(name, flags, "train", batch, device)
    for _ in range(2):
        bench.step(diffusion)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _vm("VmHWM") - before


def measure_memory(name: str, variant: str, batch: int, args: argparse.Namespace) -> float | str:
    command = [
        sys.executable,
        __file__,
        "--probe-memory",
        name,
        variant,
        str(batch),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return "error: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return float(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("diffusers", "denoising-diffusion-pytorch", "lightning"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def hardware(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {threads} threads"


def _fmt(value: float | str | None, spec: str) -> str:
    return "-" if value is None else value if isinstance(value, str) else format(value, spec)


def _ms(seconds: float | str | None) -> float | str | None:
    return seconds * 1e3 if isinstance(seconds, float) else seconds


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(columns: list[str]) -> list[str]:
    return [_row(columns), "|---" * len(columns) + "|"]


def markdown(report: dict) -> str:
    models = report["models"]
    peers = [m for m in models if m != "ours"]
    lines = [
        f"Device: {report['hardware']}; {', '.join(f'{k} {v}' for k, v in report['versions'].items())}; "
        f"{report['date']}.",
        f"Command: `{report['command']}`",
        "",
        f"Attainable rate (a large 3x3 convolution) on this device: fp32 {report['conv_flops']['fp32'] / 1e12:.2f} "
        f"TFLOP/s (TF32 on a GPU), bf16 {report['conv_flops']['bf16'] / 1e12:.2f} TFLOP/s.",
        "",
        *_header(
            ["batch", "workload", "variant", *(f"{m} ms" for m in models), *(f"ours / {p}" for p in peers)]
            + ["ours images/s", "ours % of conv peak"]
        ),
    ]
    for row in report["times"]:
        ms = [_fmt(_ms(row["seconds"].get(m)), ".0f") for m in models]
        ratios = [_fmt(row["ratio"].get(p), ".2f") for p in peers]
        share = _fmt(row.get("ours_share_of_peak") and 100 * row["ours_share_of_peak"], ".0f")
        ips = _fmt(row["images_per_second"].get("ours"), ".1f")
        lines.append(_row([str(row["batch"]), row["workload"], row["variant"], *ms, *ratios, ips, share]))
    lines += ["", *_header(["network", "parameters", "GFLOP/image forward", "GFLOP/image train step"])]
    for m, f in report["flops"].items():
        lines.append(f"| {m} | {f['params']:,} | {f['forward'] / 1e9:.2f} | {f['train'] / 1e9:.2f} |")
    if report["memory"]:
        lines += ["", *_header(["batch", "variant", *(f"{m} MiB" for m in models), *(f"ours / {p}" for p in peers)])]
        for row in report["memory"]:
            values = [_fmt(row["mib"].get(m), ".0f") for m in models]
            ratios = [_fmt(row["ratio"].get(p), ".2f") for p in peers]
            lines.append(_row([str(row["batch"]), row["variant"], *values, *ratios]))
    if report["summary"]:
        lines += ["", *[f"- {line}" for line in report["summary"]]]
    return "\n".join(lines) + "\n"


def _best(times: list[dict], batch: int, workload: str, model: str, allowed) -> tuple[str, float] | None:
    """The fastest variant of a network among those whose flags ``allowed`` accepts."""
    found = [
        (row["variant"], row["seconds"][model])
        for row in times
        if row["batch"] == batch
        and row["workload"] == workload
        and allowed(row["flags"])
        and isinstance(row["seconds"].get(model), float)
    ]
    return min(found, key=lambda x: x[1]) if found else None


def summarise(report: dict, device: torch.device) -> list[str]:
    """The issue's goals, read off this run."""
    out = []

    def fp32_only(flags: list[str]) -> bool:
        return not ({"bf16", "compile"} & set(flags))

    for batch in sorted({row["batch"] for row in report["times"]}):
        for workload in WORKLOADS:
            ours = _best(report["times"], batch, workload, "ours", fp32_only)
            peer = _best(report["times"], batch, workload, "diffusers", fp32_only)
            if ours and peer:
                out.append(
                    f"batch {batch} {workload}, fp32 weights and maths, each network at its fastest memory "
                    f"format: ours ({ours[0]}) {ours[1] * 1e3:.0f} ms, diffusers ({peer[0]}) "
                    f"{peer[1] * 1e3:.0f} ms: ratio {ours[1] / peer[1]:.2f}"
                )
    for row in report["memory"]:
        ratio = row["ratio"].get("diffusers")
        if isinstance(ratio, float):
            out.append(
                f"train-step peak memory at batch {row['batch']} ({row['variant']}): ours / diffusers = {ratio:.2f}"
            )
    if device.type == "cuda":
        for row in report["times"]:
            if row["batch"] == 128 and row["workload"] == "train" and {"bf16", "compile"} <= set(row["flags"]):
                ips = row["images_per_second"].get("ours")
                if isinstance(ips, float):
                    hours = 800_000 * 128 / ips / 3600
                    out.append(
                        f"{row['variant']} at batch 128: {ips:.0f} training images/s -> the paper's 800k "
                        f"steps of batch 128 take {hours:.1f} h on this GPU"
                    )
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    diffusion = GaussianDiffusion(make_betas("linear", 1000)).to(device)
    models = [m for m in args.models if _available(m)]
    nominal = peak_flops(device, args.threads)
    attainable = {"fp32": conv_flops(device, torch.float32), "bf16": conv_flops(device, torch.bfloat16)}
    flops = {m: count_flops(m, device) for m in models}
    times = []
    total = len(args.batch_sizes) * len(args.workloads) * len(args.variants)
    for i, (batch, workload, variant) in enumerate(
        (b, w, v) for b in args.batch_sizes for w in args.workloads for v in args.variants
    ):
        flags = parse_variant(variant)
        benches, errors = {}, {}
        for m in models:
            try:
                benches[m] = make_bench(m, flags, workload, batch, device)
                for _ in range(args.warmup + ("compile" in flags)):
                    benches[m].step(diffusion)
            except Exception as error:  # a peer that cannot run a variant is reported, not fatal
                benches.pop(m, None)
                errors[m] = f"error: {type(error).__name__}"
        for _ in range(args.repeats):
            for bench in benches.values():
                bench.timed(diffusion, args.steps_per_round)
        seconds = {m: statistics.median(b.times) for m, b in benches.items()} | errors
        ips = {m: batch / s for m, s in seconds.items() if isinstance(s, float)}
        peak = attainable["bf16" if "bf16" in flags else "fp32"]
        ours_flops = flops.get("ours", {}).get(workload if workload == "train" else "forward")
        row = {
            "batch": batch,
            "workload": workload,
            "variant": variant,
            "flags": sorted(flags),
            "seconds": seconds,
            "all_seconds": {m: b.times for m, b in benches.items()},
            "images_per_second": ips,
            "ratio": {
                p: seconds["ours"] / s
                for p, s in seconds.items()
                if p != "ours" and isinstance(s, float) and isinstance(seconds.get("ours"), float)
            },
            "ours_share_of_peak": ours_flops * ips["ours"] / peak if peak and "ours" in ips else None,
        }
        times.append(row)
        done = ", ".join(f"{m} {_fmt(_ms(s), '.0f')} ms" for m, s in seconds.items())
        print(f"[{i + 1}/{total}] batch {batch} {workload} {variant}: {done}", flush=True)
        del benches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    memory = []
    if args.memory:
        for batch in args.batch_sizes:
            for variant in args.variants:
                if "compile" in parse_variant(variant) and device.type == "cpu":
                    continue  # a cold compile per fresh process costs minutes on a CPU
                mib = {m: measure_memory(m, variant, batch, args) for m in models}
                ratio = {
                    p: mib["ours"] / v
                    for p, v in mib.items()
                    if p != "ours" and isinstance(v, float) and isinstance(mib.get("ours"), float)
                }
                memory.append({"batch": batch, "variant": variant, "mib": mib, "ratio": ratio})
                print(
                    f"memory batch {batch} {variant}: "
                    + ", ".join(f"{m} {_fmt(v, '.0f')} MiB" for m, v in mib.items()),
                    flush=True,
                )
    report = {
        "command": "python benchmarks/suite.py " + shlex.join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "hardware": hardware(device, args.threads),
        "device": device.type,
        "threads": args.threads,
        "versions": versions(),
        "nominal_peak_flops": nominal,
        "conv_flops": attainable,
        "models": models,
        "flops": flops,
        "times": times,
        "memory": memory,
    }
    report["summary"] = summarise(report, device)
    return report


def _available(name: str) -> bool:
    try:
        build(name)
    except ImportError as error:
        print(f"skipping {name}: {error}", file=sys.stderr)
        return False
    return True


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help="default: 8 32 128 on a GPU, 8 32 on a CPU (batch 128 takes ~15 s a step there)",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument(
        "--variants", nargs="+", default=None, help="fp32 or '+'-joined flags from: " + ", ".join(FLAGS)
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each network runs once per round")
    parser.add_argument("--steps-per-round", type=int, default=None, help="default: 1 on a CPU, 10 on a GPU")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 on a CPU, 3 on a GPU (+1 to compile)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory probes")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/suite_<device>")
    parser.add_argument("--probe-memory", nargs=3, metavar=("MODEL", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32, as configs/trainer/gpu.yaml
    if args.probe_memory:
        name, variant, batch = args.probe_memory
        print(probe_memory(name, parse_variant(variant), int(batch), device))
        return
    gpu = device.type == "cuda"
    args.batch_sizes = args.batch_sizes or ([8, 32, 128] if gpu else [8, 32])
    args.variants = args.variants or (
        ["fp32", "channels_last", "bf16", "compile", "bf16+compile", "bf16+compile+channels_last"]
        if gpu
        else ["fp32", "channels_last", "bf16", "bf16+channels_last", "compile"]
    )
    for variant in args.variants:
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    args.steps_per_round = args.steps_per_round or (10 if gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.steps_per_round < 1:
        parser.error("--batch-sizes, --repeats and --steps-per-round must be positive")
    out = args.out or Path(f"benchmarks/results/suite_{device.type}")
    report = run(args)
    text = markdown(report)
    print(text)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
