"""`make bench` keeps working: the suite runs end to end on our U-Net (its speed figures are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# the benchmarks end to end (no timing asserted): minutes of CPU, so the slow tier
pytestmark = [pytest.mark.integration, pytest.mark.slow]
SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


def run_suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=600)


def test_suite_writes_the_tables_and_the_json(tmp_path):
    out = tmp_path / "cpu"
    done = run_suite(
        "--models", "ours", "--batch-sizes", "1", "--variants", "fp32", "channels_last", "--repeats", "1",
        "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["models"] == ["ours"]
    assert [(r["workload"], r["variant"]) for r in report["times"]] == [
        ("train", "fp32"), ("train", "channels_last"), ("sample", "fp32"), ("sample", "channels_last"),
    ]  # fmt: skip
    assert all(r["seconds"]["ours"] > 0 for r in report["times"])
    # the U-Net's FLOPs: a training step costs about 3 forward passes
    flops = report["flops"]["ours"]
    assert flops["params"] == 35_746_307 and 2.5 < flops["train"] / flops["forward"] < 3.5
    # weights, gradients and two Adam moments of 35.7M float32 parameters alone take 545 MiB
    assert len(report["memory"]) == 2 and all(m["mib"]["ours"] > 545 for m in report["memory"])
    table = out.with_suffix(".md").read_text()
    assert "| 1 | train | channels_last |" in table and "GFLOP/image" in table


def test_bad_variant_is_rejected_with_the_allowed_flags(tmp_path):
    done = run_suite("--variants", "fp16", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "'fp16'" in done.stderr and "channels_last, bf16, compile" in done.stderr


def test_hot_path_benchmark_counts_transfers_of_the_paper_setup(tmp_path):
    out = tmp_path / "hot"
    script = SUITE.with_name("hot_path.py")
    args = ["--repeats", "1", "--steps", "5", "--log-every", "2", "--batch-size", "1", "--threads", "1"]
    done = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    ema_old, ema_ours = (
        rows["EMA update: AveragedModel (Lightning EMAWeightAveraging)"],
        rows["EMA update: one foreach lerp (ours)"],
    )
    assert ema_old["transfers"] == 2 and ema_ours["transfers"] == 0 and ema_ours["ops"] < ema_old["ops"]
    between, logging = rows["Trainer step, between logging steps"], rows["Trainer step, logging steps"]
    assert (between["steps"], between["transfers"]) == (1, 0)
    assert logging["steps"] == 2 and logging["transfers"] > 0
    assert "| EMA update: one foreach lerp (ours) |" in out.with_suffix(".md").read_text()
