"""SamplingCallback under 2-process CPU DDP (gloo): no deadlock, and one set of files, as with one process."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import unet_spec
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import SamplingCallback, default_callbacks
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.ddp


def _run(root: Path, devices: int, strategy: str) -> Path:
    torch.manual_seed(0)
    module = DiffusionModule(
        net=unet_spec(image_size=16, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
        num_timesteps=50, lr_schedule={"warmup_steps": 1},
    )  # fmt: skip
    data = DataLoader(TensorDataset(torch.zeros(16, 1, 16, 16)), batch_size=8 // devices)
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=2,
        logger=False,
        callbacks=[
            SamplingCallback(
                every_n_steps=1, num_samples=4, chain_samples=2, chain_steps=3, sampler=SamplerConfig("ddim", 5)
            ),
            *default_callbacks(0.5, progress_bar=False),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return root / "samples"


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|You defined a `validation_step`).*")
def test_two_processes_write_the_same_files_as_one_without_deadlock(tmp_path: Path) -> None:
    one = _run(tmp_path / "one", 1, "auto")
    two = _run(tmp_path / "two", 2, "ddp_spawn")
    names = sorted(p.name for p in one.glob("*.png"))
    # every step sampled once (rank 0 alone writes; other ranks wait at the next all-reduce, no barrier needed)
    assert names == sorted(p.name for p in two.glob("*.png"))
    assert names == [f"step_000000{s}_ddim5_{kind}.png" for s in (1, 2) for kind in ("chain", "grid")]
    for name in names:
        assert Image.open(two / name).size == Image.open(one / name).size
