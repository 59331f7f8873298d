"""L_vlb alone and its importance-sampled timesteps (Nichol & Dhariwal 2021, Sec. 3.3), and the logit-normal and
Laplace timestep distributions, against formulas written here."""

import math
from collections import deque

import lightning as L
import numpy as np
import pytest
import torch
from helpers import unet_spec
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import default_callbacks
from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.cli.resume import reconcile_model_settings
from ddpm_lightning.diffusion import GaussianDiffusion, LossSecondMomentSampler, make_betas
from ddpm_lightning.diffusion.timesteps import LaplaceSampler, LogitNormalSampler, TimestepSamplingConfig
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
        net = unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1,))
        DiffusionModule(net, timestep_sampling="importance")


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
        net=unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
        num_timesteps=10, schedule="cosine", lr_schedule={"warmup_steps": 1}, loss_type="vlb",
        timestep_sampling="loss_second_moment",
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
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resumed in its own folder
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


# ------------------------------------------------------------------------------- logit-normal and Laplace t
def _logit_normal_pmf(T: int, m: float, s: float) -> np.ndarray:
    """t = floor(sigmoid(u) T), u ~ N(m, s^2): P(t = k) = Phi((logit((k+1)/T) - m)/s) - Phi((logit(k/T) - m)/s)."""
    with np.errstate(divide="ignore"):
        edges = np.arange(T + 1, dtype=np.float64) / T
        logits = np.log(edges) - np.log1p(-edges)  # -inf at 0, +inf at 1
    cdf = stats.norm.cdf((logits - m) / s)
    return cdf[1:] - cdf[:-1]


def _laplace_pmf(alphas_cumprod: np.ndarray, m: float, b: float) -> np.ndarray:
    """lambda ~ Laplace(m, b) rounded to the nearest lambda_t = log(abar_t / (1 - abar_t)) of the grid."""
    log_snr = np.log(alphas_cumprod / (1.0 - alphas_cumprod))
    pmf = np.empty_like(log_snr)
    for k in range(len(log_snr)):
        upper = np.inf if k == 0 else (log_snr[k - 1] + log_snr[k]) / 2
        lower = -np.inf if k == len(log_snr) - 1 else (log_snr[k] + log_snr[k + 1]) / 2
        pmf[k] = stats.laplace.cdf(upper, m, b) - stats.laplace.cdf(lower, m, b)
    return pmf


def _chi_square_p_value(t: torch.Tensor, pmf: np.ndarray) -> float:
    """Pearson's test of the draws against pmf, the timesteps with an expected count under 5 pooled into one bin."""
    n = t.numel()
    observed = np.bincount(t.numpy(), minlength=len(pmf)).astype(np.float64)
    expected = pmf * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        assert obs[-1] == 0, "draws landed where the pmf has no mass"
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def _abar(schedule: str, T: int) -> torch.Tensor:
    return torch.cumprod(1.0 - make_betas(schedule, T), dim=0)


@pytest.mark.parametrize(("T", "m", "s"), [(100, 0.0, 1.0), (50, -0.5, 0.6), (1000, 1.0, 1.5)])
def test_logit_normal_draws_follow_the_logit_normal_pmf_on_the_integer_grid(T, m, s):
    sampler = LogitNormalSampler(T, m, s)
    pmf = _logit_normal_pmf(T, m, s)
    np.testing.assert_allclose(sampler.probabilities().numpy(), pmf, rtol=1e-9, atol=1e-15)
    t, weights = sampler.sample(200_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    assert _chi_square_p_value(t, pmf) > 1e-3
    assert torch.equal(weights, torch.ones(200_000))  # the distribution is the weighting


@pytest.mark.parametrize(("schedule", "m", "b"), [("cosine", 0.0, 0.5), ("linear", -2.0, 1.0), ("cosine", 3.0, 2.0)])
def test_laplace_draws_follow_the_laplace_pmf_on_the_log_snr_grid(schedule, m, b):
    abar = _abar(schedule, 200)
    sampler = LaplaceSampler(abar, m, b)
    pmf = _laplace_pmf(abar.numpy(), m, b)
    np.testing.assert_allclose(sampler.probabilities().numpy(), pmf, rtol=1e-9, atol=1e-15)
    t, weights = sampler.sample(200_000, "cpu", generator=torch.Generator().manual_seed(1))
    assert _chi_square_p_value(t, pmf) > 1e-3
    assert torch.equal(weights, torch.ones(200_000))


def test_the_laplace_draw_lands_on_the_nearest_log_snr():
    abar = _abar("cosine", 30)
    sampler = LaplaceSampler(abar, 0.0, 1.0)
    torch.manual_seed(0)
    t = sampler.sample(2000, "cpu")[0]
    torch.manual_seed(0)  # the same uniform numbers, turned into lambda by the Laplace inverse CDF written here
    v = torch.rand(2000, dtype=torch.float64).numpy() - 0.5
    log_snr = -1.0 * np.sign(v) * np.log(1 - 2 * np.abs(v))
    grid = np.log(abar.numpy() / (1 - abar.numpy()))
    np.testing.assert_array_equal(t.numpy(), np.abs(grid[None, :] - log_snr[:, None]).argmin(axis=1))


@pytest.mark.parametrize("name", ["logit_normal", "laplace"])
def test_the_draws_differ_per_rank_and_follow_the_same_distribution(name):
    abar = _abar("cosine", 100)
    sampler = TimestepSamplingConfig(name).build(abar)
    pmf = _logit_normal_pmf(100, 0.0, 1.0) if name == "logit_normal" else _laplace_pmf(abar.numpy(), 0.0, 0.5)
    draws = [sampler.sample(100_000, "cpu", generator=torch.Generator().manual_seed(rank))[0] for rank in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    for t in draws:
        assert _chi_square_p_value(t, pmf) > 1e-3


@pytest.mark.parametrize("name", ["logit_normal", "laplace"])
def test_unbiased_weights_are_one_over_T_p_t_and_make_the_estimate_unbiased(name):
    T, abar = 100, _abar("cosine", 100)  # a Laplace scale wide enough that every t is drawn: a low-variance estimate
    sampler = TimestepSamplingConfig(name, scale=1.0 if name == "logit_normal" else 3.0, unbiased=True).build(abar)
    pmf = _logit_normal_pmf(T, 0.0, 1.0) if name == "logit_normal" else _laplace_pmf(abar.numpy(), 0.0, 3.0)
    t, weights = sampler.sample(400_000, "cpu", generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(weights.numpy(), 1.0 / (T * pmf[t.numpy()]), rtol=1e-6)
    f = np.linspace(1.0, 2.0, T)  # a smooth per-timestep loss
    assert float((weights.numpy() * f[t.numpy()]).mean()) == pytest.approx(float(f.mean()), rel=0.02)


def test_the_setting_takes_a_bare_name_or_a_mapping_with_each_distributions_defaults():
    assert TimestepSamplingConfig.parse("laplace") == TimestepSamplingConfig.parse(
        {"name": "laplace", "loc": 0.0, "scale": 0.5, "unbiased": False}
    )
    assert TimestepSamplingConfig.parse(None).to_setting() == "uniform"
    assert TimestepSamplingConfig.parse("loss_second_moment").unbiased is True
    assert TimestepSamplingConfig.parse({"name": "loss_second_moment"}).to_setting() == "loss_second_moment"
    assert TimestepSamplingConfig("logit_normal").to_setting() == {"name": "logit_normal", "loc": 0.0, "scale": 1.0}
    setting = {"name": "laplace", "loc": -1.0, "scale": 2.0, "unbiased": True}
    assert TimestepSamplingConfig.parse(setting).to_setting() == setting
    assert TimestepSamplingConfig("uniform").build(_abar("cosine", 10)) is None
    sampler = TimestepSamplingConfig("loss_second_moment", unbiased=False).build(_abar("cosine", 10))
    assert torch.equal(sampler.sample(5, "cpu")[1], torch.ones(5))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"name": "beta"}, "unknown timestep_sampling 'beta'; allowed: uniform, loss_second_moment, logit_normal"),
        ({"name": "logit_normal", "scale": 0.0}, "scale must be > 0, got 0.0"),
        ({"name": "laplace", "loc": float("nan")}, "loc must be a finite number, got nan"),
        ({"name": "uniform", "loc": 1.0}, "'uniform' takes no loc or scale"),
        ({"name": "laplace", "mean": 1.0}, "unknown timestep_sampling key.*mean; allowed: name, loc, scale, unbiased"),
        ({"name": "laplace", "unbiased": "yes"}, "unbiased must be true, false or null, got 'yes'"),
    ],
)
def test_bad_timestep_settings_give_one_line_errors(setting, message):
    with pytest.raises(ValueError, match=message) as error:
        TimestepSamplingConfig.parse(setting)
    assert "\n" not in str(error.value)


def test_unbiased_weights_are_refused_where_p_t_vanishes():
    with pytest.raises(ValueError, match="need p_t > 0 at every t, but .* of the 1000 timesteps have p_t = 0"):
        TimestepSamplingConfig("logit_normal", scale=0.01, unbiased=True).build(_abar("cosine", 1000))


def test_a_bare_name_in_a_checkpoint_resumes_with_its_mapping():
    given = {"timestep_sampling": {"name": "logit_normal", "loc": 0.0, "scale": 1.0}}
    stored = {"timestep_sampling": {"name": "logit_normal", "loc": 0.0, "scale": 1.0}}
    assert reconcile_model_settings({"timestep_sampling": {"name": "uniform"}}, {"timestep_sampling": "uniform"}, "x")
    assert reconcile_model_settings(given, stored, "x") == ({}, [])
    assert reconcile_model_settings({"timestep_sampling": "uniform"}, stored, "x")[0] == stored  # the checkpoint's
    with pytest.raises(ValueError, match="model.timestep_sampling: checkpoint .*logit_normal.*laplace"):
        reconcile_model_settings({"timestep_sampling": "laplace"}, stored, "x")


@pytest.mark.integration
def test_a_stateless_sampler_trains_without_gathering_and_is_stored_as_its_mapping(tmp_path, monkeypatch):
    setting = {"name": "laplace", "loc": 1.0, "scale": 0.5}
    module = DiffusionModule(
        net=unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
        num_timesteps=10, schedule="cosine", lr_schedule={"warmup_steps": 1}, timestep_sampling=setting,
    )  # fmt: skip
    drawn = []
    sample = module.timestep_sampler.sample
    monkeypatch.setattr(module.timestep_sampler, "sample", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    monkeypatch.setattr(module, "_gather", lambda values: pytest.fail("a stateless sampler gathered losses"))
    trainer = _fit(module, tmp_path, 2)
    assert len(drawn) == 2
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    assert read_checkpoint(ckpt)["hyper_parameters"]["timestep_sampling"] == setting
    loaded = DiffusionModule.load_from_checkpoint(ckpt)
    assert isinstance(loaded.timestep_sampler, LaplaceSampler) and loaded.timestep_sampler.loc == 1.0
