"""Class-conditional DDPM with classifier-free guidance: the class embedding, label dropout, guidance in every sampler,
labels by global index, and conditional checkpoints, commands and the guidance sweep."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import CLASSIFIER_TEST_EPOCHS, LOG_EVERY, TransfersPerStep, fit_args, tiny, trainer, weights
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks.sampling import render_samples
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli import main
from ddpm_lightning.data import EmbeddedDigitsDataModule, to_uint8
from ddpm_lightning.diffusion import SAMPLERS, GaussianDiffusion, SamplerConfig, make_betas
from ddpm_lightning.diffusion.samplers import guided
from ddpm_lightning.evaluation.digit_classifier import DigitScorer, requested_class_accuracy
from ddpm_lightning.evaluation.fidelity import class_proportions, generate
from ddpm_lightning.evaluation.guidance import guidance_sweep
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.sampling import cycle_labels, iter_samples, load_module, proportional_labels

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_COND = DEMO_CONFIG.with_name("demo_cond.yaml")
K = 3  # classes of the tiny networks; label K is the null class
TINY = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, image_size=8)
TINY_NET = {**TINY, "num_groups": 4}


def tiny_unet(num_classes: int | None = K, seed: int = 0, **changes) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{**TINY_NET, "num_classes": num_classes, **changes})


def randomize(net: nn.Module, seed: int = 1) -> nn.Module:
    """Every weight random (the zero-initialised output layers and the null class included), so that the output
    depends on x_t, t and y."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return net


def conditional_module(**kwargs) -> DiffusionModule:
    module = DiffusionModule(net=tiny_unet(**kwargs.pop("net", {})), num_timesteps=100, **kwargs)
    randomize(module.net)
    return module.eval()


class Toy(nn.Module):
    """A conditional network whose output is known: the row ``table[y]`` of per-channel constants, whatever x_t and
    t; it records the batch size of every call."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (K + 1, C_out)
        self.calls: list[int] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(y))
        return self.table[y][:, :, None, None].expand(-1, -1, *x_t.shape[-2:]).clone()


class Unconditional(nn.Module):
    """An injected network that knows nothing of labels: ``net(x_t, t)``."""

    in_channels, image_size = 1, 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x_t)


# ------------------------------------------------------------------------------------------------ the network
@pytest.mark.unit
def test_null_labels_with_a_zero_null_embedding_give_the_unconditional_network() -> None:
    unconditional, conditional = tiny_unet(None, seed=3), tiny_unet(K, seed=3)
    # the class embedding is made last: every other weight is drawn as for the unconditional network
    shared = unconditional.state_dict()
    for name, value in shared.items():
        assert torch.equal(conditional.state_dict()[name], value), name
    assert torch.equal(conditional.class_emb.weight[K], torch.zeros(4 * TINY["ch"]))
    randomize(unconditional)
    missing, unexpected = conditional.load_state_dict(unconditional.state_dict(), strict=False)
    assert missing == ["class_emb.weight"] and not unexpected
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 50, 99])
    null = torch.full((4,), K)
    assert torch.equal(conditional(x_t, t, y=null), unconditional(x_t, t))
    # a real class moves the output
    assert not torch.allclose(conditional(x_t, t, y=torch.zeros(4, dtype=torch.long)), unconditional(x_t, t))


@pytest.mark.unit
def test_an_unconditional_unet_keeps_its_arguments_and_parameters() -> None:
    net = tiny_unet(None)
    assert "num_classes" not in net.init_args
    assert not any(name.startswith("class_emb") for name, _ in net.named_parameters())
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), y=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes=3"):
        tiny_unet(K)(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        tiny_unet(0)


# ------------------------------------------------------------------------------------------------ guidance
def _table(channels: int) -> torch.Tensor:
    return torch.arange((K + 1) * channels, dtype=torch.float32).reshape(K + 1, channels) ** 1.5


@pytest.mark.unit
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guided_output_follows_the_formula_in_one_batched_forward(scale: float) -> None:
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    toy = Toy(_table(1))
    y = torch.tensor([0, 1, 2, 0])
    out = guided(diffusion, toy, y, K, scale)(torch.randn(4, 1, 5, 5), torch.full((4,), 7))
    cond, uncond = toy.table[y][:, :, None, None], toy.table[K][None, :, None, None]
    expected = uncond + scale * (cond - uncond)  # eps~ = eps(x, null) + s (eps(x, y) - eps(x, null))
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-6)
    # s = 1: the conditional output in a plain forward; otherwise both halves in one forward of 2B
    assert toy.calls == ([4] if scale == 1 else [8])
    if scale == 1:
        torch.testing.assert_close(out, cond.expand_as(out), rtol=0, atol=0)
    if scale == 0:
        torch.testing.assert_close(out, uncond.expand_as(out), rtol=0, atol=0)


@pytest.mark.unit
def test_guidance_of_a_learned_variance_guides_the_mean_and_keeps_the_conditional_variance() -> None:
    diffusion = GaussianDiffusion(make_betas("linear", 100), variance="learned_range")
    toy = Toy(_table(2) / 10)  # channel 0: the mean, channel 1: the variance values
    y, s = torch.tensor([2, 0, 1]), 3.0
    out = guided(diffusion, toy, y, K, s)(torch.randn(3, 1, 4, 4), torch.full((3,), 9))
    table = toy.table
    mean = table[K, 0] + s * (table[y, 0] - table[K, 0])
    torch.testing.assert_close(out[:, 0], mean[:, None, None].expand(3, 4, 4), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 1], table[y, 1][:, None, None].expand(3, 4, 4), rtol=0, atol=0)


@pytest.mark.unit
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_guiding_the_output_guides_eps_for_every_objective_and_equals_two_separate_forwards(objective: str) -> None:
    diffusion = GaussianDiffusion(make_betas("linear", 100), objective=objective)
    net = randomize(tiny_unet()).eval()
    x_t, t, y, s = torch.randn(3, 1, 8, 8), torch.tensor([3, 40, 90]), torch.tensor([0, 2, 1]), 2.0
    null = torch.full((3,), K)
    with torch.no_grad():
        out = guided(diffusion, net, y, K, s)(x_t, t)
        out_cond, out_uncond = net(x_t, t, y=y), net(x_t, t, y=null)  # two separate forwards
    torch.testing.assert_close(out, out_uncond + s * (out_cond - out_uncond), rtol=1e-5, atol=1e-5)
    eps_cond = diffusion.model_output_to_eps(out_cond, x_t, t)
    eps_uncond = diffusion.model_output_to_eps(out_uncond, x_t, t)
    expected = eps_uncond + s * (eps_cond - eps_uncond)
    torch.testing.assert_close(diffusion.model_output_to_eps(out, x_t, t), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.unit
def test_guidance_scale_is_validated_and_labelled() -> None:
    for bad in (-1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
            SamplerConfig(guidance_scale=bad)
    assert SamplerConfig("ddim", 50, guidance_scale=3).label(1000) == "ddim50-s3"
    assert SamplerConfig("ddim", 50, guidance_scale=1.5).label(1000) == "ddim50-s1.5"
    assert SamplerConfig("ddim", 50).label(1000) == "ddim50"
    assert "guidance_scale" not in SamplerConfig("ddim", 50).to_dict()
    config = SamplerConfig("dpmpp_2m", 20, guidance_scale=0.0)
    assert SamplerConfig(**config.to_dict()) == config


# ------------------------------------------------------------------------------------------------ the module
@pytest.mark.unit
def test_module_settings_of_a_conditional_model_are_checked() -> None:
    with pytest.raises(ValueError, match="does not take labels"):
        DiffusionModule(net=Unconditional(), num_classes=K, num_timesteps=100)
    with pytest.raises(ValueError, match="model.num_classes=4 but the network UNet has num_classes=3"):
        DiffusionModule(net=tiny_unet(K), num_classes=4, num_timesteps=100)
    with pytest.raises(ValueError, match="guidance_scale=2 needs a class-conditional model"):
        DiffusionModule(net=tiny_unet(None), num_timesteps=100, sampler={"name": "ddim", "guidance_scale": 2})
    with pytest.raises(ValueError, match="p_uncond must be in"):
        DiffusionModule(net=tiny_unet(K), num_timesteps=100, p_uncond=1.0)


@pytest.mark.unit
def test_an_unconditional_preset_is_made_conditional_by_num_classes() -> None:
    module = DiffusionModule(net=tiny_unet(None), num_classes=K, num_timesteps=100)
    assert module.net.num_classes == K and module.num_classes == K
    assert module.hparams.net["init_args"]["num_classes"] == K and module.hparams.num_classes == K


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_an_injected_unconditional_network_without_y_keeps_working() -> None:
    module = DiffusionModule(net=Unconditional(), num_timesteps=100)
    assert module.num_classes is None and module.hparams.num_classes is None
    x = module.sample(2, SamplerConfig("ddim", 3))
    assert x.shape == (2, 1, 8, 8)
    loss = module.training_step((torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0)
    assert torch.isfinite(loss)


@pytest.mark.unit
def test_label_dropout_replaces_labels_with_the_null_class_at_rate_p_uncond() -> None:
    module = conditional_module(p_uncond=0.3)
    n = 20_000
    labels = torch.arange(n) % K
    batch = (torch.zeros(n, 1, 1, 1), labels)
    torch.manual_seed(5)
    drop = torch.rand(n) < 0.3  # Algorithm 1 of Ho & Salimans 2021: y <- null with probability p_uncond
    torch.manual_seed(5)
    y = module.train_labels(batch)
    assert torch.equal(y, torch.where(drop, torch.full_like(labels, K), labels))
    assert 0.29 < float((y == K).float().mean()) < 0.31  # 0.3 +- 3 standard deviations
    assert torch.equal(conditional_module(p_uncond=0.0).train_labels(batch), labels)
    with pytest.raises(ValueError, match="bare images"):
        module.train_labels(torch.zeros(1, 1, 8, 8))


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_conditional_training_step_and_validation_loss_run() -> None:
    module = conditional_module().train()
    batch = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.net.class_emb.weight.grad is not None
    fixed, n = module._fixed_seed_loss(batch, 0)
    assert torch.isfinite(fixed) and n == 4


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_mapping_batch_trains_like_the_image_label_pair(tmp_path: Path) -> None:
    module = conditional_module().train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    losses = []
    for batch in ((x, y), {"image": x, "label": y}, {"pixel_values": x, "labels": y}):
        torch.manual_seed(0)
        losses.append(module.training_step(batch, 0))
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    torch.manual_seed(0)
    assert not torch.equal(module.training_step((x, torch.tensor([1, 2, 0, 1])), 0), losses[0])  # labels are used
    # a whole fit on a data set of {"image", "label"} items (the default collate makes a mapping of batches)
    items = [{"image": torch.rand(1, 8, 8) * 2 - 1, "label": i % K} for i in range(12)]
    fitted = tiny(num_classes=K, p_uncond=0.2)
    trainer(tmp_path, 3, [], logger=False, enable_progress_bar=False).fit(fitted, DataLoader(items, batch_size=4))
    assert fitted.trainer.global_step == 3


@pytest.mark.integration
def test_conditional_steps_between_logging_steps_make_no_host_device_transfer(tmp_path: Path) -> None:
    counter = TransfersPerStep()
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    data = DataLoader(TensorDataset(x, torch.arange(48) % K), batch_size=4)
    trainer(tmp_path, 12, [counter], logger=CSVLogger(tmp_path)).fit(tiny(num_classes=K, p_uncond=0.5), data)
    per_step = counter.per_step()
    quiet = {s: n for s, n in per_step.items() if s and (s + 1) % LOG_EVERY}
    assert len(quiet) == 8 and set(quiet.values()) == {0}, quiet  # label dropout included


@pytest.mark.unit
def test_sampling_labels_are_checked() -> None:
    module = conditional_module()
    with pytest.raises(ValueError, match="class-conditional"):
        module.sample(2, SamplerConfig("ddim", 2))
    with pytest.raises(ValueError, match=r"class labels \[4\] are not classes of this model: allowed 0..2, or 3"):
        module.sample(2, SamplerConfig("ddim", 2), y=[0, 4])
    with pytest.raises(ValueError, match="got 1 labels y for 2 samples"):
        module.sample(2, SamplerConfig("ddim", 2), y=[0])
    unconditional = DiffusionModule(net=tiny_unet(None), num_timesteps=100)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.sample(2, SamplerConfig("ddim", 2), y=[0, 1])
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        unconditional.sample(2, SamplerConfig("ddim", 2, guidance_scale=3))


@pytest.mark.unit
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_samples_per_class_from_noise_that_does_not_depend_on_the_class(name: str) -> None:
    module = conditional_module()
    config = SamplerConfig(name, 4, guidance_scale=2.0)
    first = config.visited(module.diffusion)[0]
    x_a, chain_a = module.sample(2, config, seeds=[5, 6], y=[0, 0], return_steps=[first])
    x_b, chain_b = module.sample(2, config, seeds=[5, 6], y=[1, 1], return_steps=[first])
    assert torch.equal(chain_a[first], chain_b[first])  # x_T: the same seed, the same noise, for every class
    assert torch.isfinite(x_a).all() and not torch.allclose(x_a, x_b, atol=1e-3)
    x_c = module.sample(2, SamplerConfig(name, 4, guidance_scale=1.0), seeds=[5, 6], y=[0, 0])
    assert not torch.allclose(x_a, x_c, atol=1e-3)  # guidance changes the samples


@pytest.mark.unit
def test_guided_sampling_with_a_learned_variance_runs_every_sampler() -> None:
    module = conditional_module(variance="learned_range")
    for name in SAMPLERS:
        x = module.sample(3, SamplerConfig(name, 3, guidance_scale=2.0), seeds=[0, 1, 2], y=[0, 1, 2])
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.unit
def test_labels_are_a_function_of_the_global_index_whatever_the_batching() -> None:
    module = conditional_module()
    config = SamplerConfig("ddim", 3, guidance_scale=2.0)
    whole = torch.cat([images for _, images in iter_samples(module, range(6), sampler=config, batch_size=6)])
    # another process's share, one at a time
    single = {batch[0]: images for batch, images in iter_samples(module, [4, 1], sampler=config, batch_size=1)}
    for i in (1, 4):
        torch.testing.assert_close(single[i][0], whole[i], rtol=0, atol=1e-5)
    # the default labels cycle through the classes: sample i has class i mod K
    explicit = module.sample(6, config, seeds=list(range(6)), y=[i % K for i in range(6)])
    torch.testing.assert_close(whole, explicit, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        next(iter_samples(DiffusionModule(net=tiny_unet(None), num_timesteps=100), [0], labels=cycle_labels([0])))


@pytest.mark.unit
def test_proportional_labels_keep_the_proportions_in_any_run_of_indices() -> None:
    proportions = [0.5, 0.3, 0.2]
    label = proportional_labels(proportions)
    for start in (0, 37, 1000):
        counts = torch.bincount(torch.tensor([label(i) for i in range(start, start + 100)]), minlength=3)
        assert (counts - torch.tensor([50, 30, 20])).abs().max() <= 2, counts
    assert [label(i) for i in range(50)] == [label(i) for i in range(50)]
    assert [cycle_labels([3, 7])(i) for i in range(5)] == [3, 7, 3, 7, 3]
    with pytest.raises(ValueError, match="proportions"):
        proportional_labels([0.0, -1.0])


@pytest.mark.unit
def test_the_sampling_grid_of_a_conditional_model_has_one_row_per_class() -> None:
    module = conditional_module()
    x0, grid, _ = render_samples(module, 6, 2, 2, sampler=SamplerConfig("ddim", 2))
    assert x0.shape == (6, 1, 8, 8)
    assert tuple(grid.shape) == (3, K * 10 + 2, 2 * 10 + 2)  # K rows of 2 images of 8 px, 2 px padding


@pytest.mark.unit
def test_class_proportions_of_the_digits_and_a_mismatch_with_the_model() -> None:
    proportions = class_proportions(EmbeddedDigitsDataModule(image_size=28).real_images_dataset("train"))
    assert len(proportions) == 10 and abs(sum(proportions) - 1) < 1e-9 and min(proportions) > 0.05


# ------------------------------------------------------------------------------------------------ end to end
N = 3  # steps per epoch of test_resume.fit_args
CONDITIONAL = ("--model.num_classes=10", "--model.p_uncond=0.2")


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conditional digits model trained 2 epochs straight and, in another folder, 1 epoch then resumed."""
    root = tmp_path_factory.mktemp("conditional")
    main(fit_args(root / "straight", 2 * N, *CONDITIONAL))
    main(fit_args(root / "resumed", N, *CONDITIONAL))
    main(fit_args(root / "resumed", 2 * N, *CONDITIONAL, "--ckpt_path=last"))
    return root


@pytest.mark.integration
def test_a_conditional_model_checkpoints_and_resumes_exactly(conditional_run: Path) -> None:
    straight, resumed = weights(conditional_run / "straight"), weights(conditional_run / "resumed")
    assert straight.keys() == resumed.keys() and "ema.net.class_emb.weight" in straight
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    hparams = read_checkpoint(conditional_run / "resumed" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert hparams["num_classes"] == 10 and hparams["net"]["init_args"]["num_classes"] == 10
    assert hparams["p_uncond"] == 0.2


@pytest.mark.integration
def test_a_loaded_conditional_checkpoint_samples_per_class_with_every_sampler(conditional_run: Path) -> None:
    module = load_module(conditional_run / "straight" / "checkpoints" / "last.ckpt", "cpu")
    assert module.num_classes == 10
    for name in SAMPLERS:
        x = module.sample(2, SamplerConfig(name, 2, guidance_scale=3.0), seeds=[0, 0], y=[1, 7])
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


@pytest.mark.integration
def test_sample_command_with_classes_guidance_and_a_grid_by_class(conditional_run: Path, tmp_path: Path) -> None:
    ckpt = conditional_run / "straight" / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples"
    args = ["sample", "--ckpt", str(ckpt), "--num", "4", "--out", str(out), "--sampler", "ddim", "--steps", "2"]
    run([*args, "--class", "3", "--class", "7", "--guidance-scale", "2", "--grid-by-class", "--device", "cpu"])
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert Image.open(out / "grid.png").size == (2 * 18 + 2, 2 * 18 + 2)  # 2 classes x 2 images of 16 px
    # image i has the i-th class of the list, cycling, from the seed of image i
    module = load_module(ckpt, "cpu")
    expected = module.sample(4, SamplerConfig("ddim", 2, guidance_scale=2.0), seeds=[0, 1, 2, 3], y=[3, 7, 3, 7])
    written = torch.from_numpy(np.asarray(Image.open(out / "000001.png"), dtype=np.float32))
    assert torch.equal(written, to_uint8(expected[1].cpu())[0].float())


def run(args: list[str]) -> None:
    """A ``ddpm`` command that must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


@pytest.mark.integration
def test_guidance_and_classes_on_an_unconditional_checkpoint_are_clear_errors(tmp_path: Path, capsys) -> None:
    ckpt = str(Path(__file__).parent / "fixtures" / "legacy_digits8.ckpt")  # an unconditional model
    base = ["sample", "--ckpt", ckpt, "--num", "2", "--out", str(tmp_path / "out")]
    for extra, message in ((["--guidance-scale", "3"], "guidance_scale=3 needs"), (["--class", "1"], "--class")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unconditional model"):
        guidance_sweep(ckpt, tmp_path / "guidance", device="cpu")


@pytest.mark.integration
def test_nll_of_a_conditional_model_uses_the_true_labels_and_says_so(conditional_run: Path, tmp_path: Path, capsys):
    ckpt = conditional_run / "straight" / "checkpoints" / "last.ckpt"
    out = tmp_path / "nll.json"
    run(["nll", "--ckpt", str(ckpt), "--num", "4", "--t-samples", "2", "--out", str(out), "--device", "cpu"])
    report = json.loads(out.read_text())
    assert report["num_classes"] == 10 and report["likelihood"] == "conditional on the true labels, log p(x | y)"
    assert "log p(x | y)" in capsys.readouterr().out


@pytest.mark.integration
def test_evaluate_refuses_data_with_another_number_of_classes(conditional_run: Path) -> None:
    with pytest.raises(ValueError, match="the reference data have 3 classes but the model"):
        generate(conditional_run / "straight" / "checkpoints" / "last.ckpt", 2, proportions=[1, 1, 1], device="cpu")


@pytest.mark.integration
def test_requested_class_accuracy_reads_the_true_labels_of_real_digits(classifier_cache: Path) -> None:
    digits = EmbeddedDigitsDataModule()
    scorer = DigitScorer.from_digits(digits, epochs=CLASSIFIER_TEST_EPOCHS, cache_dir=classifier_cache)
    images, labels = digits.split_arrays("val")
    assert requested_class_accuracy(scorer.classifier, images[:200], labels[:200]) > 0.9
    assert requested_class_accuracy(scorer.classifier, images[:200], (labels[:200] + 1) % 10) < 0.1


@pytest.mark.integration
def test_guidance_sweep_writes_a_table_and_a_grid_per_scale(
    conditional_run: Path, classifier_cache: Path, tmp_path: Path
) -> None:
    ckpt = conditional_run / "straight" / "checkpoints" / "last.ckpt"
    out = tmp_path / "guidance"
    paths = guidance_sweep(
        ckpt, out, scales=[1, 2], num=20, steps=2, batch_size=20, classifier_epochs=CLASSIFIER_TEST_EPOCHS,
        classifier_cache_dir=classifier_cache, device="cpu",
    )  # fmt: skip
    table = json.loads((out / "table.json").read_text())
    assert [row["guidance_scale"] for row in table["rows"]] == [1.0, 2.0]
    assert [row["label"] for row in table["rows"]] == ["ddpm2", "ddpm2-s2"]
    for row in table["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["frechet_distance"] >= 0
    assert (out / "grid_s1.png").is_file() and (out / "grid_s2.png").is_file() and paths["grid_s2.png"].is_file()
    # 10 rows (one per class) of 2 images of 16 px
    assert Image.open(out / "grid_s2.png").size == (2 * 18 + 2, 10 * 18 + 2)
    md = (out / "table.md").read_text()
    assert "| 1 |" in md and "| 2 |" in md


@pytest.mark.integration
def test_the_conditional_demo_config_writes_a_grid_by_class_and_the_requested_class_accuracy(
    tmp_path: Path, classifier_cache: Path
) -> None:
    assert yaml.safe_load(DEMO_COND.read_text())["model"]["num_classes"] == 10
    config = yaml.safe_load(DEMO_CONFIG.read_text())  # demo_cond.yaml composes the demo's recipe and callbacks
    sizes = {
        "SamplingCallback": {
            "every_n_steps": 2, "num_samples": 20, "chain_samples": 2, "sampler": {"name": "ddim", "steps": 2},
        },
        "DemoReport": {
            "num_samples": 20, "num_eval_samples": 20, "untrained_baseline": True,
            "sampler": {"name": "ddim", "steps": 2, "autoguidance_scale": 2.0},
            "classifier_epochs": CLASSIFIER_TEST_EPOCHS, "classifier_cache_dir": str(classifier_cache),
        },
    }  # fmt: skip
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(sizes.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    override = tmp_path / "small.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": config["trainer"]["callbacks"]}}))
    run = tmp_path / "demo_cond"
    main(
        ["fit", "-c", str(DEMO_CONFIG), "-c", str(DEMO_COND), "-c", str(override), f"--trainer.default_root_dir={run}",
         "--trainer.enable_progress_bar=false", "--model.net.init_args.ch_mult=[1, 2]",
         "--model.net.init_args.attn_resolutions=[]",
         "--model.num_timesteps=100", "--trainer.max_steps=2"]
    )  # fmt: skip
    module = load_module(run / "demo.ckpt", "cpu")
    assert module.num_classes == 10 and module.net.num_classes == 10
    assert Image.open(run / "samples.png").size == (2 * 30 + 2, 10 * 30 + 2)  # 10 rows (classes) of 2 digits of 28 px
    metrics = json.loads((run / "metrics.json").read_text())
    for row in ("trained", "untrained"):
        assert 0.0 <= metrics[row]["requested_class_accuracy"] <= 1.0
    (grid,) = run.rglob("step_0000002_ddim2_grid.png")
    assert Image.open(grid).size == (2 * 30 + 2, 10 * 30 + 2)
