"""One prepared check of the template on a GPU: training and sampling speed, the 256x256 memory, the versions.

    python benchmarks/gpu_check.py                    # on a GPU: about 5 minutes at most
    python benchmarks/gpu_check.py --dry-run          # tiny sizes on the CPU, seconds: every code path but compile

In priority order, each measurement after the previous one, until the time cap (``--time-cap``, a global deadline:
what is left is recorded as ``skipped: time cap``):

1. training images/s of the paper's 35.7M U-Net at 32x32, global batch 128: ``ddpm fit`` (configs/cifar10.yaml +
   configs/trainer/gpu.yaml) in bf16-mixed + channels_last on :class:`synthetic.SyntheticCIFAR10` (random uint8
   images through CIFAR-10's own pipeline), beside the plain loop of ``hot_path.py``; then ``ddpm fit`` in fp32
   (TF32 matmuls, as configs/trainer/gpu.yaml) and in bf16 + ``torch.compile`` (the compile time apart); diffusers'
   ``UNet2DModel`` of the same layout in the plain loop. FLOPs per image are counted once (``FlopCounterMode``); the
   model FLOPs utilisation divides the model's FLOP rate by the device's dense bf16 peak (data sheets: H100/H200
   SXM 989 TFLOP/s, A100 312; unknown devices: null).
2. sampling images/s at batch 1024, bf16 autocast, DPM-Solver++(2M) 20 steps (``DiffusionModule.sample``), and the
   minutes 50,000 samples for FID take at that rate.
3. peak memory (``torch.cuda.max_memory_allocated``: weights, gradients, Adam moments, activations) and images/s of
   the 256x256 U-Net (configs/model/unet_256.yaml, 113.7M) at per-GPU batch 16 and 64, bf16 + channels_last, with
   and without activation checkpointing.
4. the versions (torch, CUDA, cuDNN, driver from nvidia-smi) and the device.

The JSON (``<out>/gpu_check.json``) and a Markdown table (``gpu_check.md``) are rewritten, atomically, after every
measurement, so a run killed by a timeout still leaves what it measured. A dry run writes ``gpu_check_dry_run.*``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hot_path import plain_step  # noqa: E402
from suite import GPU_PEAKS, _header, _row, net_flops  # noqa: E402

from ddpm_lightning.diffusion import GaussianDiffusion, SamplerConfig, make_betas  # noqa: E402
from ddpm_lightning.io import atomic_write, write_json  # noqa: E402
from ddpm_lightning.lit_module import DiffusionModule  # noqa: E402
from ddpm_lightning.models import UNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_STEPS, PAPER_BATCH = 800_000, 128
# Ho et al. 2020: 800k steps of batch 128 in 10.6 hours on a TPU v3-8
PAPER_TPU_IMAGES_PER_S = PAPER_STEPS * PAPER_BATCH / (10.6 * 3600)
GOAL_TRAIN_HOURS = 5.0
GOAL_IMAGES_PER_S = PAPER_STEPS * PAPER_BATCH / (GOAL_TRAIN_HOURS * 3600)
FID_SAMPLES, GOAL_SAMPLE_MINUTES = 50_000, 5.0
SECTIONS = {
    "training_32": "1. training, 32x32, global batch 128",
    "sampling_32": "2. sampling, batch 1024, bf16, DPM-Solver++(2M) 20 steps",
    "memory_256": "3. the 256x256 U-Net: peak memory and images/s",
}
DATA = (
    "synthetic.SyntheticCIFAR10: random uint8 32x32 RGB images (seeded) through CIFAR10DataModule's pipeline "
    "(PIL image -> tensor in [-1, 1], seeded flips, workers); nothing read from disk"
)
NOT_RUN = "not run: the check stopped before it"
TIME_CAP = "skipped: time cap"


@dataclass(frozen=True)
class Sizes:
    """What the check runs: the paper's sizes on a GPU, tiny ones for a dry run."""

    net32: dict[str, Any]
    #: the magnitude-preserving U-Net of configs/cifar10_edm2.yaml's run, when ``own_net``
    mp32: dict[str, Any]
    net256: dict[str, Any]
    #: whether ``ddpm fit`` gets ``net32`` rather than configs/cifar10.yaml's own network (the paper's)
    own_net: bool
    image256: int
    train_batch: int
    warmup_steps: int
    timed_steps: int
    num_workers: int
    sample_batch: int
    sample_steps: int
    batches256: tuple[int, ...]
    steps256: int
    bf16: bool
    compile: bool
    #: seconds each kind of measurement needs at least on an H100-class GPU: it is skipped when less is left
    needs: dict[str, float]


def preset(name: str, image_size: int) -> dict[str, Any]:
    """The U-Net settings of ``configs/model/<name>.yaml`` at ``image_size``."""
    init_args = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())["init_args"]
    return {**init_args, "image_size": image_size}


def full_sizes() -> Sizes:
    return Sizes(
        net32=preset("unet_cifar10", 32),
        mp32=preset("mp_unet_cifar10", 32),
        net256=preset("unet_256", 256),
        own_net=False,
        image256=256,
        train_batch=PAPER_BATCH,
        warmup_steps=15,
        timed_steps=60,
        num_workers=8,
        sample_batch=1024,
        sample_steps=20,
        batches256=(16, 64),
        steps256=4,
        bf16=True,
        compile=True,
        needs={"flops": 5, "fit": 20, "plain": 8, "compile": 120, "sample": 15, "train256": 15},
    )


def dry_sizes() -> Sizes:
    tiny = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "num_groups": 4}
    return Sizes(
        net32={**preset("unet_cifar10", 32), **tiny},
        mp32=preset("mp_unet_tiny_rgb", 32),
        net256={**preset("unet_256", 32), **tiny, "ch_mult": [1, 1, 2]},
        own_net=True,
        image256=32,
        train_batch=4,
        warmup_steps=1,
        timed_steps=1,
        num_workers=0,
        sample_batch=4,
        sample_steps=2,
        batches256=(1, 2),
        steps256=1,
        bf16=False,  # bf16 autocast on a CPU without bf16 units is emulated: seconds a step even for this U-Net
        compile=False,
        needs={"flops": 0, "fit": 0, "plain": 0, "compile": 0, "sample": 0, "train256": 0},
    )


# ------------------------------------------------------------------------------------------------ measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_lightning(
    sizes: Sizes, device: torch.device, precision: str, compile: bool, stop_at: float, edm2: bool = False
) -> dict:
    """Images/s of ``ddpm fit`` (in this process) over a window of steps after ``warmup_steps``; ``edm2``: with
    configs/cifar10_edm2.yaml composed on top (the magnitude-preserving U-Net and EDM2's training options)."""
    from ddpm_lightning.cli.fit import fit  # needs jsonargparse: an ImportError is this measurement's error

    with tempfile.TemporaryDirectory() as folder:
        clock = Path(folder) / "clock.json"
        steps = sizes.warmup_steps + sizes.timed_steps
        config: dict[str, Any] = {
            "model": {"runtime": {"compile": compile}},
            "data": {
                "class_path": "synthetic.SyntheticCIFAR10",
                "init_args": {
                    "batch_size": sizes.train_batch,
                    "num_workers": sizes.num_workers,
                    "num_images": sizes.train_batch * (steps + 1),
                },
            },
            "trainer": {
                "default_root_dir": folder,
                "max_steps": steps,
                "precision": precision,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "limit_val_batches": 0,
                "callbacks": [
                    {
                        "class_path": "synthetic.StepClock",
                        "init_args": {"out": str(clock), "warmup": sizes.warmup_steps, "stop_at": stop_at},
                    }
                ],
            },
            # every default callback but the final checkpoint (hundreds of MB written after the timed steps)
            "default_callbacks": ["EMA", "RNGStates", "GracefulStop", "ImagesPerSecond", "WandbRunId"],
        }
        if sizes.own_net and edm2:
            config["model"]["net"] = {"class_path": "ddpm_lightning.models.MPUNet", "init_args": sizes.mp32}
        elif sizes.own_net:
            config["model"]["net"] = {"class_path": "ddpm_lightning.models.UNet", "init_args": sizes.net32}
        (Path(folder) / "check.yaml").write_text(yaml.safe_dump(config))
        trainer = "gpu" if device.type == "cuda" else "cpu"
        configs = [ROOT / "configs" / "cifar10.yaml", ROOT / "configs" / "trainer" / f"{trainer}.yaml"]
        if edm2:
            configs.insert(1, ROOT / "configs" / "cifar10_edm2.yaml")
        fit([arg for path in [*configs, Path(folder) / "check.yaml"] for arg in ("-c", str(path))])
        timed = json.loads(clock.read_text())
    result = {"path": "ddpm fit" + (" (cifar10_edm2)" if edm2 else ""), "precision": precision, "compile": compile,
              **timed}  # fmt: skip
    if timed["window_steps"]:
        seconds = timed["window_seconds"]
        result["images_per_second"] = timed["images"] / seconds
        result["ms_per_step"] = 1e3 * seconds / timed["window_steps"]
        # the warm-up steps beyond the time a steady step takes: cuDNN autotuning and, with compile, compilation
        result["compile_seconds" if compile else "setup_seconds"] = (
            timed["warmup_seconds"] - sizes.warmup_steps * seconds / timed["window_steps"]
        )
    return result


def plain_loop(
    net: torch.nn.Module, sizes: Sizes, image_size: int, batch: int, steps: int, device: torch.device, stop_at: float
) -> dict:
    """Images/s of ``hot_path.plain_step`` (L_simple, backward, clipping, fused Adam) in bf16 + channels_last."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_betas("linear", 1000)).to(device)
    net = net.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)
    x0 = (torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1).contiguous(
        memory_format=torch.channels_last
    )
    _sync(device)
    start = time.perf_counter()
    for _ in range(sizes.warmup_steps):
        plain_step(diffusion, net, optimizer, x0, bf16=sizes.bf16)
    _sync(device)
    window, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.time() < stop_at):
        plain_step(diffusion, net, optimizer, x0, bf16=sizes.bf16)
        done += 1
    _sync(device)
    seconds = time.perf_counter() - window
    return {
        "path": "plain loop (hot_path.plain_step)",
        "precision": "bf16 autocast" if sizes.bf16 else "fp32",
        "batch": batch,
        "warmup_seconds": window - start,
        "window_steps": done,
        "window_seconds": seconds,
        "images_per_second": batch * done / seconds,
        "ms_per_step": 1e3 * seconds / done,
    }


def train_256(sizes: Sizes, device: torch.device, batch: int, checkpointing: bool, stop_at: float) -> dict:
    """Peak memory and images/s of the 256x256 U-Net's training step, with or without activation checkpointing."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    net = UNet(**{**sizes.net256, "grad_checkpointing": checkpointing})
    result: dict[str, Any] = {"batch": batch, "activation_checkpointing": checkpointing}
    try:
        result |= plain_loop(net, sizes, sizes.image256, batch, sizes.steps256, device, stop_at)
    except torch.OutOfMemoryError as error:
        result["status"] = f"error: out of memory ({str(error).splitlines()[0][:200]})"
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["device_mib"] = torch.cuda.get_device_properties(device).total_memory / 2**20
    else:
        result["peak_mib"] = None
        result["memory_note"] = "no CUDA allocator on a CPU: peak memory is measured on a GPU only"
    return result


def sample_rate(sizes: Sizes, device: torch.device) -> dict:
    """Images/s of ``DiffusionModule.sample`` with DPM-Solver++(2M) at ``sample_steps``, under bf16 autocast."""
    torch.manual_seed(0)
    module = DiffusionModule(net=UNet(**sizes.net32)).to(device)
    sampler = SamplerConfig("dpmpp_2m", sizes.sample_steps)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=sizes.bf16):
        module.sample(sizes.sample_batch, SamplerConfig("dpmpp_2m", 2), seed=0)  # warm-up: autotuning at this batch
        _sync(device)
        start = time.perf_counter()
        x0 = module.sample(sizes.sample_batch, sampler, seed=1)
        _sync(device)
    seconds = time.perf_counter() - start
    rate = sizes.sample_batch / seconds
    return {
        "batch": sizes.sample_batch,
        "sampler": sampler.to_dict(),
        "precision": "bf16 autocast" if sizes.bf16 else "fp32",
        "seconds": seconds,
        "images_per_second": rate,
        "ms_per_network_evaluation": 1e3 * seconds / sizes.sample_steps,
        "fid_samples": FID_SAMPLES,
        "fid_minutes": FID_SAMPLES / rate / 60,
        "finite": bool(torch.isfinite(x0).all()),
    }


def diffusers_net(sizes: Sizes) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` in the layout of our 32x32 U-Net (ImportError without diffusers)."""
    from ddpm_lightning.interop.diffusers import _config_of
    from ddpm_lightning.models import DiffusersUNet

    return DiffusersUNet(_config_of(UNet(**sizes.net32)))


@dataclass(frozen=True)
class Measurement:
    section: str
    name: str
    what: str
    need: str
    run: Callable[[float], dict]


def measurements(sizes: Sizes, device: torch.device) -> list[Measurement]:
    """Every measurement, in the issue's priority order; ``run(stop_at)`` takes the ``time.time()`` of the cap."""
    batch, steps = sizes.train_batch, sizes.timed_steps
    bf16 = "bf16-mixed" if sizes.bf16 else "32-true"
    autocast = "bf16" if sizes.bf16 else "fp32"

    def compiled(stop_at: float) -> dict:
        if not sizes.compile:
            return {"status": "skipped: dry run (torch.compile of the U-Net takes minutes on a CPU)"}
        return fit_lightning(sizes, device, bf16, True, stop_at)

    def flops(net: torch.nn.Module, image_size: int) -> dict:
        counted = net_flops(net.to(device), image_size)
        return {"params": counted["params"], "forward_flops": counted["forward"], "train_flops": counted["train"]}

    out = [
        Measurement("training_32", "flops", "FLOPs per image (FlopCounterMode, once)", "flops",
                    lambda s: flops(UNet(**sizes.net32), 32)),
        Measurement("training_32", "fit_bf16", f"ddpm fit, {bf16} + channels_last, batch {batch}", "fit",
                    lambda s: fit_lightning(sizes, device, bf16, False, s)),
        Measurement("training_32", "plain_bf16", f"plain loop, {autocast} + channels_last, batch {batch}", "plain",
                    lambda s: plain_loop(UNet(**sizes.net32), sizes, 32, batch, steps, device, s)),
        Measurement("training_32", "fit_edm2_bf16", f"ddpm fit, configs/cifar10_edm2.yaml (37.9M MPUNet), {bf16}, "
                    f"batch {batch}", "fit", lambda s: fit_lightning(sizes, device, bf16, False, s, edm2=True)),
        Measurement("training_32", "fit_fp32", f"ddpm fit, fp32 (TF32 matmuls on a GPU), batch {batch}", "fit",
                    lambda s: fit_lightning(sizes, device, "32-true", False, s)),
        Measurement("training_32", "fit_bf16_compile", f"ddpm fit, {bf16} + torch.compile, batch {batch}",
                    "compile", compiled),
        Measurement("training_32", "diffusers_bf16", f"diffusers UNet2DModel, plain loop, {autocast}, batch {batch}",
                    "plain", lambda s: plain_loop(diffusers_net(sizes), sizes, 32, batch, steps, device, s)),
        Measurement("sampling_32", "dpmpp_2m", f"DiffusionModule.sample, batch {sizes.sample_batch}, {autocast}, "
                    f"dpmpp_2m {sizes.sample_steps} steps", "sample", lambda s: sample_rate(sizes, device)),
        Measurement("memory_256", "flops", "FLOPs per image (FlopCounterMode, once)", "flops",
                    lambda s: flops(UNet(**sizes.net256), sizes.image256)),
    ]  # fmt: skip
    for b in sizes.batches256:
        for checkpointing in (False, True):
            label = " + activation checkpointing" if checkpointing else ""
            out.append(
                Measurement(
                    "memory_256",
                    f"batch{b}" + ("_checkpointing" if checkpointing else ""),
                    f"plain loop, {autocast} + channels_last, batch {b}{label}",
                    "train256",
                    lambda s, b=b, c=checkpointing: train_256(sizes, device, b, c, s),
                )
            )
    return out


# ------------------------------------------------------------------------------------------------ environment
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command_output(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device and its dense bf16 peak."""
    import ddpm_lightning

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "packages": {p: _version(p) for p in ("lightning", "torchvision", "torchmetrics", "jsonargparse", "diffusers")},
        "ddpm_lightning": f"{ddpm_lightning.__version__} from {Path(ddpm_lightning.__file__).parent.parent.name}/",
        "git_commit": _command_output(["git", "rev-parse", "HEAD"]),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "device_mib": props.total_memory / 2**20,
            "multiprocessors": props.multi_processor_count,
        }
        smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        env["nvidia_smi"] = _command_output(smi) or "nvidia-smi not found or failed"
    else:
        env["device_name"] = platform.processor() or "cpu"
    env["bf16_peak_tflops"] = bf16_peak_tflops(env["device_name"]) if device.type == "cuda" else None
    return env


def bf16_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a known GPU by name (``suite.GPU_PEAKS``); None for any other."""
    return next((peaks["bf16"] for key, peaks in GPU_PEAKS.items() if key in device_name), None)


# ------------------------------------------------------------------------------------------------ report
def derive(report: dict) -> None:
    """Model TFLOP/s and FLOPs utilisation of the training rows; the goals read off the measured rows."""
    peak = report["environment"].get("bf16_peak_tflops")
    for section in ("training_32", "memory_256"):
        rows = report[section]
        per_image = rows["flops"].get("train_flops")
        for name, row in rows.items():
            if name == "flops" or not isinstance(row.get("images_per_second"), float) or per_image is None:
                continue
            row["model_tflops"] = per_image * row["images_per_second"] / 1e12
            row["mfu"] = row["model_tflops"] / peak if peak else None
    train = [
        (row["images_per_second"], name)
        for name, row in report["training_32"].items()
        if name.startswith("fit_") and isinstance(row.get("images_per_second"), float)
    ]
    goals: dict[str, Any] = {
        "paper_tpu_v3_8_images_per_second": PAPER_TPU_IMAGES_PER_S,
        "goal_images_per_second": GOAL_IMAGES_PER_S,
        "goal_train_hours": GOAL_TRAIN_HOURS,
        "goal_fid_minutes": GOAL_SAMPLE_MINUTES,
    }
    if train:
        rate, name = max(train)
        goals |= {
            "best_fit": name,
            "best_fit_images_per_second": rate,
            "paper_run_hours": PAPER_STEPS * PAPER_BATCH / rate / 3600,
            "vs_paper_tpu": rate / PAPER_TPU_IMAGES_PER_S,
            "train_goal_met": rate >= GOAL_IMAGES_PER_S,
        }
    minutes = report["sampling_32"]["dpmpp_2m"].get("fid_minutes")
    if minutes is not None:
        goals |= {"fid_minutes": minutes, "fid_goal_met": minutes <= GOAL_SAMPLE_MINUTES}
    report["goals"] = goals


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    title = "DRY RUN on the CPU (tiny sizes: no figure here is a measurement)" if report["dry_run"] else "GPU check"
    lines = [
        f"# {title}: {env['device_name']}",
        "",
        f"`{report['command']}` ({report['date']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
        f"nvidia-smi: {env.get('nvidia_smi', '-')}; {report['elapsed_s']:.0f} s of a {report['time_cap_s']:.0f} s "
        f"cap{'' if report['finished'] else '; stopped early'})",
        "",
        f"Data: {report['data']}.",
    ]
    for section, heading in SECTIONS.items():
        lines += ["", f"## {heading}", "", *_header(["measurement", "images/s", "ms/step", "peak GiB", "MFU", "notes"])]
        for name, row in report[section].items():
            if name == "flops":
                flops = row.get("train_flops")
                note = f"{flops / 1e9:.1f} GFLOP/image per training step" if flops else row["status"]
                lines.append(_row([row["what"], "", "", "", "", note]))
                continue
            notes = [] if row["status"] == "measured" else [row["status"]]
            for key, label in (("compile_seconds", "compile {:.0f} s"), ("fid_minutes", "50k samples {:.1f} min")):
                if isinstance(row.get(key), float):
                    notes.append(label.format(row[key]))
            peak = row.get("peak_mib")
            lines.append(
                _row(
                    [
                        row["what"],
                        _fmt(row.get("images_per_second"), ",.0f"),
                        _fmt(row.get("ms_per_step"), ".1f"),
                        _fmt(peak / 1024 if peak else None, ".1f"),
                        _fmt(row.get("mfu") and 100 * row["mfu"], ".0f") + ("%" if row.get("mfu") else ""),
                        "; ".join(notes),
                    ]
                )
            )
    goals = report["goals"]
    lines += [
        "",
        "## 4. goals",
        "",
        f"- paper, TPU v3-8: {goals['paper_tpu_v3_8_images_per_second']:,.0f} training images/s (800k steps x 128 in "
        f"10.6 h); goal: under {GOAL_TRAIN_HOURS:.0f} h on one GPU = {GOAL_IMAGES_PER_S:,.0f} images/s.",
    ]
    if "best_fit_images_per_second" in goals:
        lines.append(
            f"- fastest ddpm fit here ({goals['best_fit']}): {goals['best_fit_images_per_second']:,.0f} images/s = "
            f"{goals['vs_paper_tpu']:.2f}x the TPU; the paper's run would take {goals['paper_run_hours']:.1f} h "
            f"(goal {'met' if goals['train_goal_met'] else 'not met'})."
        )
    if "fid_minutes" in goals:
        lines.append(
            f"- 50,000 samples: {goals['fid_minutes']:.1f} min (goal {GOAL_SAMPLE_MINUTES:.0f} min: "
            f"{'met' if goals['fid_goal_met'] else 'not met'})."
        )
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    """The JSON and the Markdown, each written atomically."""
    derive(report)
    write_json(report, out.with_suffix(".json"))
    text = markdown(report)
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_check(
    sizes: Sizes,
    device: torch.device,
    out: Path,
    time_cap: float,
    *,
    dry_run: bool,
    command: str,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Every measurement in order until ``time_cap`` seconds have passed on ``clock``; the report is saved to
    ``out`` (.json, .md) after each one."""
    start = clock()
    plan = measurements(sizes, device)
    report: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "time_cap_s": time_cap,
        "elapsed_s": 0.0,
        "finished": False,
        "data": DATA,
        **{section: {} for section in SECTIONS},
        "environment": environment(device),
    }
    for m in plan:
        report[m.section][m.name] = {"what": m.what, "status": NOT_RUN}
    save(report, out)
    for m in plan:
        left = time_cap - (clock() - start)
        row = report[m.section][m.name]
        if left < max(sizes.needs[m.need], 1e-9):
            row |= {"status": TIME_CAP, "seconds_left": max(left, 0.0), "seconds_needed": sizes.needs[m.need]}
        else:
            print(f"[{clock() - start:5.0f} s] {m.section} {m.name}: {m.what}", flush=True)
            try:
                row |= {"status": "measured", **m.run(time.time() + left)}
            except Exception as error:  # one failed measurement is recorded; the next one runs
                row["status"] = f"error: {type(error).__name__}: {str(error).strip()[:400]}"
            _free(device)
        report["elapsed_s"] = clock() - start
        save(report, out)
        print(f"  -> {row['status']}: {_fmt(row.get('images_per_second'), ',.1f')} images/s", flush=True)
    report["finished"] = True
    report["elapsed_s"] = clock() - start
    save(report, out)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, seconds (no compile)")
    parser.add_argument("--device", default=None, help="default: cuda when available (the CPU for --dry-run)")
    parser.add_argument("--time-cap", type=float, default=300.0, help="seconds for the whole check (default 300)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="the folder of the files")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 for --dry-run)")
    args = parser.parse_args(argv)
    if args.time_cap < 0:
        parser.error(f"--time-cap must be 0 or more seconds, got {args.time_cap}")
    if args.threads or args.dry_run:
        # one thread: a dry run's tiny U-Net gains nothing from more, and threads waiting on busy cores stall it
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32, as configs/trainer/gpu.yaml
    elif not args.dry_run:
        parser.error("no GPU here: the check measures a GPU (use --dry-run to rehearse it on the CPU)")
    name = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    out = args.out / name
    command = "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = run_check(
        dry_sizes() if args.dry_run else full_sizes(),
        device,
        out,
        args.time_cap,
        dry_run=args.dry_run,
        command=command,
    )
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
