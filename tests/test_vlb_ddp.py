"""BPDCallback under 2-process CPU DDP (gloo): the same val/bpd as one process."""

from pathlib import Path

import lightning as L
import pytest
from test_fid import TinyImages, single_thread, tiny_diffusion  # noqa: F401 (autouse fixture: one thread here too)

from ddpm_lightning.callbacks import BPDCallback, default_callbacks

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
