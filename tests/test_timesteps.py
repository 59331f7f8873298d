"""L_vlb alone and its importance-sampled timesteps (Nichol & Dhariwal 2021, Sec. 3.3), against formulas written
here."""

import math
from collections import deque

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import default_callbacks
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.diffusion import GaussianDiffusion, LossSecondMomentSampler, make_betas
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.unit


def test_the_history_keeps_the_last_losses_of_each_timestep_in_order():
    T, K = 7, 3
    sampler = LossSecondMomentSampler(T, history=K)
    reference = [deque(maxlen=K) for _ in range(T)]
    rng = np.random.default_rng(0)
    for size in (5, 1, 40, 12, 0, 9):
        t = rng.integers(0, T, size)
        losses = rng.normal(size=size)
        for ti, li in zip(t, losses, strict=True):
            reference[ti].append(li)
        sampler.update(torch.as_tensor(t), torch.as_tensor(losses))
        for ti in range(T):
            count = len(reference[ti])
            assert int(sampler.counts[ti]) == count
            np.testing.assert_array_equal(sampler.history[ti, K - count :].numpy(), np.array(reference[ti]))


def test_the_probabilities_are_uniform_until_warm_then_follow_the_second_moment():
    T, K, u = 4, 2, 0.1
    sampler = LossSecondMomentSampler(T, history=K, uniform_prob=u)
    sampler.update(torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5, 0.5, 4.0]))
    np.testing.assert_allclose(sampler.probabilities().numpy(), 0.25)  # t = 3 has one loss of two
    sampler.update(torch.tensor([3]), torch.tensor([2.0]))
    rms = np.array([math.sqrt((1 + 9) / 2), 2.0, 0.5, math.sqrt((16 + 4) / 2)])
    expected = rms / rms.sum() * (1 - u) + u / T
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-12)
    assert sampler.probabilities().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_the_weights_make_the_estimate_unbiased():
    T = 6
    sampler = LossSecondMomentSampler(T, history=1, uniform_prob=0.0)
    sampler.update(torch.arange(T), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    p = sampler.probabilities()
    t, weights = sampler.sample(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights.double(), 1.0 / (T * p[t]), rtol=1e-6, atol=0)
    # sum_t p_t w_t f(t) = mean_t f(t) exactly, for any f; and the draws follow p_t
    f = torch.arange(T, dtype=torch.float64) ** 2
    assert float((p / (T * p) * f).sum()) == pytest.approx(float(f.mean()), rel=1e-12)
    frequencies = torch.bincount(t, minlength=T).double() / t.numel()
    torch.testing.assert_close(frequencies, p, atol=0.015, rtol=0)
    assert float((weights.double() * f[t]).mean()) == pytest.approx(float(f.mean()), rel=0.05)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="history"):
        LossSecondMomentSampler(10, history=0)
    with pytest.raises(ValueError, match="uniform_prob"):
        LossSecondMomentSampler(10, uniform_prob=1.5)
    with pytest.raises(ValueError, match="loss_type"):
        GaussianDiffusion(make_betas("cosine", 10), loss_type="kl")
    with pytest.raises(ValueError, match="loss_weighting='min_snr'.*loss_type='vlb'"):
        GaussianDiffusion(make_betas("cosine", 10), loss_type="vlb", loss_weighting="min_snr")
    with pytest.raises(ValueError, match="timestep_sampling 'importance'.*loss_second_moment"):
        DiffusionModule(image_size=8, in_channels=1, ch=32, ch_mult=(1,), timestep_sampling="importance")


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_the_vlb_loss_is_t_times_the_bounds_term_and_trains_the_mean(variance):
    torch.manual_seed(0)
    T = 20
    diffusion = GaussianDiffusion(make_betas("cosine", T), variance=variance, loss_type="vlb")
    factor = diffusion.output_channels_factor
    scale = torch.nn.Parameter(torch.tensor(0.3))

    def model(x_t, t):  # mean and variance outputs both depend on the parameter
        return scale * x_t.repeat(1, factor, 1, 1)

    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    t, noise = torch.tensor([0, 7, 19]), torch.randn(3, 1, 4, 4)
    loss = diffusion.training_loss(model, x0, t=t, noise=noise, reduction="none")
    x_t = diffusion.q_sample(x0, t, noise)
    expected = T * diffusion.vb_terms_bpd(model(x_t, t).detach(), x0, x_t, t)
    torch.testing.assert_close(loss.detach(), expected)
    loss.mean().backward()
    assert scale.grad is not None and scale.grad.abs() > 0  # the mean gets the bound's gradient (no stop-gradient)


def _module(**kwargs) -> DiffusionModule:
    return DiffusionModule(
        image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_timesteps=10,
        schedule="cosine", warmup_steps=1, ema_decay=0.5, loss_type="vlb", timestep_sampling="loss_second_moment",
        **kwargs,
    )  # fmt: skip


def _fit(module: DiffusionModule, root, steps: int, ckpt_path=None) -> L.Trainer:
    data = torch.round((torch.rand(32, 1, 8, 8) * 2 - 1 + 1) * 127.5) / 127.5 - 1
    trainer = L.Trainer(
        default_root_dir=root, accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=default_callbacks(0.5, progress_bar=False),
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=8), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.integration
def test_the_history_is_checkpointed_and_restored_on_resume(tmp_path):
    torch.manual_seed(0)
    module = _module()
    trainer = _fit(module, tmp_path, 3)
    assert int(module.timestep_sampler.counts.sum()) == 3 * 8  # every loss of every step, capped at 10 per t
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = read_checkpoint(ckpt)["timestep_sampler"]
    torch.testing.assert_close(saved["history"], module.timestep_sampler.history)
    assert read_checkpoint(ckpt)["hyper_parameters"]["timestep_sampling"] == "loss_second_moment"

    resumed = _module()
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["history"] = pl_module.timestep_sampler.history.clone()

    data = torch.zeros(8, 1, 8, 8)
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*default_callbacks(0.5, progress_bar=False), Peek()],
    )  # fmt: skip
    trainer.fit(resumed, DataLoader(TensorDataset(data), batch_size=8), ckpt_path=ckpt)
    torch.testing.assert_close(seen["history"], saved["history"])
    assert int(resumed.timestep_sampler.counts.sum()) == 4 * 8
