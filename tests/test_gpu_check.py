"""The prepared GPU check rehearses on the CPU: every section filled or skipped with a reason, the files rewritten
after each measurement, the time cap honoured (no speed figure is asserted)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.integration
SECTIONS = ("training_32", "sampling_32", "memory_256")


@pytest.fixture(autouse=True)
def _keep_threads():
    """A dry run sets torch's thread count to 1: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _snapshots(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every report the check saves, as read back from its JSON file right after the write."""
    saved, save = [], gpu_check.save

    def recording_save(report: dict, out: Path) -> None:
        save(report, out)
        saved.append(json.loads(out.with_suffix(".json").read_text()))

    monkeypatch.setattr(gpu_check, "save", recording_save)
    return saved


def _rows(report: dict) -> list[dict]:
    return [row for section in SECTIONS for row in report[section].values()]


# the whole rehearsal: about 10 s on 2 idle cores (30 s on busy ones), so the slow tier; the tests below cover the
# time cap and the rewrites in the default tier
@pytest.mark.slow
def test_the_dry_run_fills_every_section_and_rewrites_the_files_after_each_measurement(tmp_path, monkeypatch):
    saved = _snapshots(monkeypatch)
    gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert report["dry_run"] and report["finished"]
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device_type"] == "cpu"
    rows = _rows(report)
    assert len(rows) == 13
    for row in rows:
        if row["status"] == "measured":
            figure = row.get("images_per_second", row.get("train_flops"))
            assert isinstance(figure, float) and figure > 0, row
        else:  # only what a CPU cannot do is left out, with the reason
            assert row["status"].startswith("skipped: dry run"), row
    assert report["training_32"]["fit_bf16_compile"]["status"].startswith("skipped")
    assert report["training_32"]["fit_bf16"]["path"] == "ddpm fit"
    assert report["training_32"]["fit_edm2_bf16"]["path"] == "ddpm fit (cifar10_edm2)"
    assert report["training_32"]["fit_edm2_bf16"]["status"] == "measured"
    assert report["sampling_32"]["dpmpp_2m"]["finite"] and report["sampling_32"]["dpmpp_2m"]["fid_minutes"] > 0
    assert report["memory_256"]["batch2_checkpointing"]["activation_checkpointing"] is True
    # one write before the first measurement, one after each, one at the end: measurement k is in write k + 1
    assert len(saved) == len(rows) + 2
    order = [(s, n) for s in SECTIONS for n in report[s]]
    for k, (section, name) in enumerate(order):
        assert saved[k][section][name]["status"] == gpu_check.NOT_RUN
        assert saved[k + 1][section][name]["status"] == report[section][name]["status"]
    table = (tmp_path / "gpu_check_dry_run.md").read_text()
    assert table.startswith("# DRY RUN") and "## 3. the 256x256 U-Net" in table and "| plain loop, fp32" in table


def test_a_time_cap_reached_after_the_first_measurement_leaves_it_and_skips_the_rest(tmp_path, monkeypatch):
    now = [0.0]
    saved = _snapshots(monkeypatch)
    original = gpu_check.save

    def save_then_run_out_of_time(report: dict, out: Path) -> None:
        original(report, out)
        if len(saved) == 2:  # the write after the first measurement
            now[0] = 1e9

    monkeypatch.setattr(gpu_check, "save", save_then_run_out_of_time)
    sizes, device = gpu_check.dry_sizes(), torch.device("cpu")
    torch.set_num_threads(1)
    gpu_check.run_check(sizes, device, tmp_path / "x", 300, dry_run=True, command="test", clock=lambda: now[0])
    report = json.loads((tmp_path / "x.json").read_text())
    first = report["training_32"]["flops"]
    assert first["status"] == "measured" and first["train_flops"] > first["forward_flops"] > 0
    rest = [row for row in _rows(report) if row is not first]
    assert rest and all(row["status"] == gpu_check.TIME_CAP for row in rest)
    assert report["finished"] and (tmp_path / "x.md").is_file()


def test_a_zero_time_cap_still_writes_the_environment_and_every_section(tmp_path):
    gpu_check.main(["--dry-run", "--time-cap", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert all(row["status"] == gpu_check.TIME_CAP for row in _rows(report))
    assert set(SECTIONS) <= report.keys() and report["environment"]["python"]
    assert "skipped: time cap" in (tmp_path / "gpu_check_dry_run.md").read_text()


@pytest.mark.unit
def test_the_wheel_script_carries_what_ddpm_fit_and_the_check_import():
    script = (ROOT / "scripts" / "gpu" / "download_wheels.sh").read_text()
    for wheel in ("jsonargparse==", "docstring-parser==", "typeshed-client==", "diffusers==", "matplotlib=="):
        assert f"    {wheel}" in script
    assert "--python-version 3.12" in script and "-d .whl" in script
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
