"""Files the commands write: the umask's mode, atomic reports, and sample folders that appear only when complete."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from ddpm_lightning import io
from ddpm_lightning.cli import evaluate as evaluate_command
from ddpm_lightning.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture
def umask():
    """Set a umask for the test, restored after it."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = io.write_json({"a": 1}, tmp_path / "report.json")
    saved = io.save_png(torch.zeros(1, 4, 4, dtype=torch.uint8), tmp_path / "image.png")
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    assert [stat.S_IMODE(p.stat().st_mode) for p in (written, saved)] == [mode, mode]


def test_an_interrupted_folder_write_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    with pytest.raises(KeyboardInterrupt), io.atomic_folder(out) as tmp:
        io.write_json({}, tmp / "000000.json")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_folder_write_into_an_existing_folder_adds_its_files_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with io.atomic_folder(out) as tmp:
        io.write_json({}, tmp / "new.json")
        assert not (out / "new.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]


def test_sample_refuses_an_out_that_is_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "samples.png"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt", str(tmp_path / "any.ckpt"), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out} is an existing file" in err and "Traceback" not in err
    assert out.read_bytes() == b"precious"


def test_evaluate_writes_its_report_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fidelity = sys.modules["ddpm_lightning.evaluation.fidelity"]
    monkeypatch.setattr(fidelity, "fetch_fid_weights", lambda weights: None)
    monkeypatch.setattr(fidelity, "_calculate_metrics", lambda *args, **kwargs: {"frechet_inception_distance": 1.0})
    samples = tmp_path / "samples"
    for i in range(2):
        io.save_png(torch.full((3, 8, 8), 100, dtype=torch.uint8), samples / f"{i:06d}.png")
    written = []
    atomic_write = io.atomic_write
    monkeypatch.setattr(io, "atomic_write", lambda path, write: written.append(Path(path)) or atomic_write(path, write))
    out = tmp_path / "report.json"
    argv = ["--samples", str(samples), "--data", str(samples), "--metrics", "fid", "--out", str(out)]
    assert evaluate_command.main(argv) == 0
    assert written == [out] and json.loads(out.read_text())["fid"] == 1.0
