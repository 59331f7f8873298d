"""A class-conditional model under 2-process CPU DDP (gloo): the class-sampled FID equals the 1-process one, because
the class of sample i, like its seed, is a function of i."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import IMAGE_SIZE, DigestDump, FrozenDiffusion, TinyExtractor, TinyImages, fid_callback

from ddpm_lightning.callbacks import default_callbacks
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

NUM_SAMPLES = 7  # ragged on 2 ranks: 4 and 3 samples
SAMPLER = SamplerConfig("ddim", 4, guidance_scale=2.0)


def conditional_diffusion() -> DiffusionModule:
    """A frozen tiny conditional DDPM with random weights (the null class included), so that its samples depend on
    their class and on the guidance (4 GroupNorm groups: with one channel per group the norms would erase the time
    and class embeddings, which are per-channel offsets)."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=3, image_size=IMAGE_SIZE, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
        num_groups=4, num_classes=3,
    )  # fmt: skip
    module = FrozenDiffusion(
        net=net,
        num_timesteps=20,
        schedule={"name": "linear", "beta_end": 0.01},
        objective="v",
        lr_schedule={"warmup_steps": 0},
        sampler=SAMPLER,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return module


def run(tmp_path: Path, devices: int, strategy: str) -> tuple[float, dict[str, str]]:
    out = tmp_path / f"{devices}proc"
    out.mkdir()
    callback = fid_callback(out / "cache", num_samples=NUM_SAMPLES, batch_size=2, sampler=SAMPLER)
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
        callbacks=[callback, *default_callbacks(0.0, progress_bar=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(conditional_diffusion(), datamodule=TinyImages(batch_size=4))
    digests: dict[str, str] = {}
    for path in sorted(out.glob("rank*.json")):
        shard = json.loads(path.read_text())
        assert not digests.keys() & shard.keys(), "a sample was drawn on two ranks"
        digests.update(shard)
    return float(trainer.callback_metrics["val/fid"]), digests


@pytest.mark.timeout(400)
@pytest.mark.filterwarnings("ignore:.*(does not have many workers|You defined a `validation_step`).*")
def test_two_process_class_sampled_fid_equals_one_process_fid(tmp_path: Path) -> None:
    fid1, digests1 = run(tmp_path, devices=1, strategy="auto")
    fid2, digests2 = run(tmp_path, devices=2, strategy="ddp_spawn")
    assert sorted(digests1, key=int) == [str(i) for i in range(NUM_SAMPLES)]
    assert digests2 == digests1  # the same images (classes and seeds), whichever rank drew them
    assert abs(fid2 - fid1) / abs(fid1) < 1e-5
    # the samples depend on their class: sample 0 (class 0) redrawn as class 1 from the same seed differs
    module = conditional_diffusion()
    x_class0, x_class1 = module.sample(1, SAMPLER, seeds=[0], y=[0]), module.sample(1, SAMPLER, seeds=[0], y=[1])
    assert float((x_class0 - x_class1).abs().max()) > 1e-3
