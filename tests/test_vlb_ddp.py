"""Under 2-process CPU DDP (gloo): BPDCallback's val/bpd equals one process's; the importance-sampling history is
the same on both ranks."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TinyImages, tiny_diffusion, unet_spec
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import BPDCallback, default_callbacks
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.usefixtures("single_thread")  # one thread here too: the CPU is shared

NUM_IMAGES = 5  # ragged on 2 ranks: 3 and 2 images


def run(tmp_path: Path, devices: int, strategy: str) -> float:
    out = tmp_path / f"{devices}proc"
    trainer = L.Trainer(
        default_root_dir=out,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        callbacks=[
            BPDCallback(every_n_steps=None, num_images=NUM_IMAGES, t_samples=3, batch_size=2),
            *default_callbacks(0.0, progress_bar=False),  # tiny_diffusion: no EMA
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(tiny_diffusion(), datamodule=TinyImages(batch_size=4))
    return float(trainer.callback_metrics["val/bpd"])


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|You defined a `validation_step`).*")
def test_two_process_bpd_equals_one_process_bpd_with_a_ragged_last_shard(tmp_path: Path) -> None:
    bpd1 = run(tmp_path, devices=1, strategy="auto")
    bpd2 = run(tmp_path, devices=2, strategy="ddp_spawn")
    assert bpd1 > 0
    assert bpd2 == pytest.approx(bpd1, rel=1e-6)


class SaveHistory(L.Callback):
    """Each rank writes its timestep history at the end (ddp_spawn keeps the processes' state to themselves)."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = pl_module.timestep_sampler
        torch.save(
            {"history": sampler.history.cpu(), "counts": sampler.counts.cpu()}, self.out / f"{trainer.global_rank}.pt"
        )


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|You defined a `validation_step`).*")
def test_the_importance_sampling_history_is_the_same_on_every_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DiffusionModule(
        net=unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
        num_timesteps=10, schedule="cosine", lr_schedule={"warmup_steps": 0}, loss_type="vlb",
        timestep_sampling="loss_second_moment",
    )  # fmt: skip
    data = TensorDataset(torch.rand(32, 1, 8, 8) * 2 - 1)
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*default_callbacks(0.0, progress_bar=False), SaveHistory(tmp_path)],
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    rank0, rank1 = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert int(rank0["counts"].sum()) == 3 * 2 * 4  # both ranks' losses of every step
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
