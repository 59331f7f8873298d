"""EDM2's magnitude-preserving U-Net: magnitudes at initialisation, forced weight normalisation after every optimizer
step, conditioning, exact resume, equal weights in 2-process DDP, and the commands that cannot take it."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import STEPS_PER_EPOCH, fit_args, one_line_cli_error, weights

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import MPUNet
from ddpm_lightning.models.mp_unet import MPConv, mp_cat, mp_silu, mp_sum
from ddpm_lightning.models.unet import timestep_embedding

SMALL = {"in_channels": 1, "image_size": 16, "ch": 16, "ch_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]}


def block_rms(net: MPUNet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
    """The RMS of every encoder and decoder block's output for one forward pass."""
    rms: dict[str, float] = {}

    def record(name: str):
        return lambda module, inputs, out: rms.__setitem__(name, out.pow(2).mean().sqrt().item())

    hooks = [layer.register_forward_hook(record(f"{part}.{name}")) for part in ("enc", "dec")
             for name, layer in getattr(net, part).items()]  # fmt: skip
    with torch.no_grad():
        net(x, t, y=y)
    for hook in hooks:
        hook.remove()
    return rms


@pytest.mark.unit
def test_the_magnitude_preserving_operations_keep_unit_rms_of_unit_gaussians() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1_000_000, generator=generator, dtype=torch.float64)
    assert mp_silu(a).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.01)  # silu's RMS on N(0, 1): 0.596
    assert mp_sum(a, b, 0.3).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
    cat = mp_cat(a.reshape(1, 10, -1)[:, :4], b.reshape(1, 10, -1)[:, :6], 0.5)
    assert cat.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.unit
@pytest.mark.parametrize("num_classes", [None, 10])
def test_at_initialisation_every_block_keeps_the_activations_rms_within_half_and_twice(num_classes: int | None) -> None:
    torch.manual_seed(0)
    net = MPUNet(in_channels=3, image_size=16, ch=16, ch_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8],
                 channels_per_head=16, num_classes=num_classes)  # fmt: skip
    x, t = torch.randn(8, 3, 16, 16), torch.randint(0, 1000, (8,))
    y = None if num_classes is None else torch.randint(0, num_classes + 1, (8,))
    rms = block_rms(net, x, t, y)
    with torch.no_grad():
        out = net(x, t, y=y)
    assert len(rms) == len(net.enc) + len(net.dec) == 22
    assert all(0.5 <= value <= 2.0 for value in rms.values()), rms
    assert out.abs().max() == 0  # the output gain starts at 0


@pytest.mark.unit
def test_every_weight_has_unit_norm_per_output_channel_after_an_optimizer_step() -> None:
    torch.manual_seed(0)
    module = DiffusionModule(net=MPUNet(**SMALL), num_timesteps=50, lr=0.05, lr_schedule={"warmup_steps": 0})
    optimizer = module.configure_optimizers()["optimizer"]
    batch = torch.rand(8, 1, 16, 16) * 2 - 1
    for _ in range(3):
        loss = module.batch_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layers = [m for m in module.net.modules() if isinstance(m, MPConv)]
    assert len(layers) > 10
    for layer in layers:
        w = layer.weight.detach().double().flatten(1)
        fan_in = w.shape[1]
        # stored at unit RMS and used as w / sqrt(fan_in): unit norm per output channel (EDM2 Eq. 47)
        torch.testing.assert_close(w.norm(dim=1) / math.sqrt(fan_in), torch.ones(w.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-3)  # fmt: skip
    assert module.net.out_gain.item() != 0  # the gains are free parameters and have moved


@pytest.mark.unit
def test_the_null_class_adds_no_class_embedding_and_other_labels_do() -> None:
    torch.manual_seed(0)
    net = MPUNet(**SMALL, num_classes=3)
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for block in [*net.enc.values(), *net.dec.values()]:
            if hasattr(block, "emb_gain"):
                block.emb_gain.fill_(1.0)
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), 10)
    with torch.no_grad():
        unconditional = mp_silu(net.emb_noise(math.sqrt(2) * timestep_embedding(t, 16)))
        torch.testing.assert_close(net.embedding(t, torch.full((4,), 3)), unconditional)
    out = [net(x, t, y=torch.full((4,), k)) for k in range(4)]
    assert all((out[i] - out[j]).abs().max() > 1e-4 for i in range(4) for j in range(i))


@pytest.mark.unit
def test_bad_settings_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"attn_resolutions \[5\] are not feature-map sizes; allowed: \[16, 8\]"):
        MPUNet(**{**SMALL, "attn_resolutions": [5]})
    with pytest.raises(ValueError, match="image_size=18 cannot be halved 2 times by ch_mult=.1, 2, 2.: it must be"):
        MPUNet(**{**SMALL, "image_size": 18, "ch_mult": [1, 2, 2], "attn_resolutions": []})


@pytest.mark.unit
def test_the_cifar10_preset_is_near_the_papers_size() -> None:
    import yaml

    spec = yaml.safe_load(Path("configs/model/mp_unet_cifar10.yaml").read_text())
    net = MPUNet(in_channels=3, image_size=32, **spec["init_args"])
    assert sum(p.numel() for p in net.parameters()) == 37_871_517  # the DDPM U-Net: 35,746,307


# ------------------------------------------------------------------------------------ in training, through the CLI
def mp_args(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """fit_args with the magnitude-preserving U-Net (and EDM2's Adam beta2) in place of the U-Net."""
    args = [a for a in fit_args(run_dir, max_steps) if not a.startswith("--model.net")]
    return [*args, "--model.net=ddpm_lightning.models.MPUNet", "--model.net.init_args.ch=16",
            "--model.net.init_args.ch_mult=[1,2]", "--model.net.init_args.num_blocks=1",
            "--model.net.init_args.attn_resolutions=[8]", "--model.net.init_args.dropout=0.1",
            "--model.optimizer.betas=[0.9,0.99]", "--model.lr=0.01", *extra]  # fmt: skip


@pytest.mark.integration
def test_a_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path: Path) -> None:
    n = STEPS_PER_EPOCH
    main(mp_args(tmp_path / "straight", 2 * n))
    main(mp_args(tmp_path / "resumed", n))
    main(mp_args(tmp_path / "resumed", 2 * n, "--ckpt_path=last"))
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 2 * n
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert any(name.startswith("raw.net.enc") for name in straight)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


class SaveWeights(L.Callback):
    """Each process writes its raw network weights when training ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ddp_processes_keep_equal_normalised_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DiffusionModule(net=MPUNet(**{**SMALL, "attn_resolutions": []}), num_timesteps=50, lr=0.01,
                             lr_schedule={"warmup_steps": 0}, timestep_sampling="logit_normal")  # fmt: skip
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SaveWeights(tmp_path)], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, EmbeddedDigitsDataModule(batch_size=8, image_size=16))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = DiffusionModule(net=MPUNet(**{**SMALL, "attn_resolutions": []}), num_timesteps=50).net.state_dict()
    for name in rank0:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0 if k.endswith("weight"))
    for name, value in rank0.items():
        if name.endswith(".weight"):
            rms = value.double().flatten(1).pow(2).mean(1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3, msg=name)


@pytest.mark.integration
def test_convert_to_diffusers_refuses_it_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(mp_args(tmp_path / "run", 1))
    err = one_line_cli_error(
        [
            "convert",
            "--to-diffusers",
            str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
            "--out",
            str(tmp_path / "d"),
        ],
        capsys,
    )
    assert "MPUNet" in err and "UNet2DModel" in err
    assert not (tmp_path / "d").exists()
