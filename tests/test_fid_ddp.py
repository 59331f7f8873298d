"""FIDCallback under 2-process CPU DDP (gloo): the same samples and the same FID as one process."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import DigestDump, TinyExtractor, TinyImages, fid_callback, tiny_diffusion

from ddpm_lightning.callbacks import default_callbacks

pytestmark = pytest.mark.usefixtures("single_thread")  # one thread here too: the CPU is shared

NUM_SAMPLES = 5  # ragged on 2 ranks: 3 and 2 samples


def run(tmp_path: Path, devices: int, strategy: str) -> tuple[float, dict[str, str], Path]:
    out = tmp_path / f"{devices}proc"
    out.mkdir()
    callback = fid_callback(out / "cache", num_samples=NUM_SAMPLES, batch_size=2, every_n_steps=None)
    callback = DigestDump(
        out,
        **{k: getattr(callback, k) for k in ("num_samples", "batch_size", "sampler", "cache_dir")},
        every_n_steps=None,
        feature_extractor=TinyExtractor(),
    )
    trainer = L.Trainer(
        default_root_dir=out,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        callbacks=[callback, *default_callbacks(0.0, progress_bar=False)],  # tiny_diffusion: no EMA
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(tiny_diffusion(), datamodule=TinyImages(batch_size=4))
    digests: dict[str, str] = {}
    for path in sorted(out.glob("rank*.json")):
        shard = json.loads(path.read_text())
        assert not digests.keys() & shard.keys(), "a sample was drawn on two ranks"
        digests.update(shard)
    (stats,) = (out / "cache").glob("*.pt")
    return float(trainer.callback_metrics["val/fid"]), digests, stats


@pytest.mark.ddp
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|You defined a `validation_step`).*")
def test_two_process_fid_equals_one_process_fid_with_a_ragged_last_shard(tmp_path: Path) -> None:
    fid1, digests1, stats1 = run(tmp_path, devices=1, strategy="auto")
    fid2, digests2, stats2 = run(tmp_path, devices=2, strategy="ddp_spawn")

    assert sorted(digests1, key=int) == [str(i) for i in range(NUM_SAMPLES)]
    assert digests2 == digests1  # the same images, whichever rank drew them
    # the real statistics computed on 2 shards equal those of one process (float32 features of other batches)
    real1, real2 = torch.load(stats1, weights_only=True), torch.load(stats2, weights_only=True)
    torch.testing.assert_close(real2["features_cov_sum"], real1["features_cov_sum"], rtol=1e-5, atol=1e-6)
    assert real2["num_samples"] == real1["num_samples"]
    assert abs(fid2 - fid1) / abs(fid1) < 1e-5
