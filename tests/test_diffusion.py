"""The diffusion maths against float64 formulas written here from the papers' equations."""

import math

import numpy as np
import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, SamplerConfig, make_betas, sample, samplers, sampling_timesteps

pytestmark = pytest.mark.unit
T = 1000


def paper_linear_betas(T: int = 1000) -> np.ndarray:
    return np.linspace(1e-4, 0.02, T, dtype=np.float64)


def paper_cosine_betas(T: int = 1000, s: float = 0.008) -> np.ndarray:
    # Nichol & Dhariwal 2021, Eq. 17, betas clipped at 0.999
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(T + 1, dtype=np.float64)
    abar = f(t) / f(0)
    return np.minimum(1 - abar[1:] / abar[:-1], 0.999)


@pytest.fixture(params=["linear", "cosine"])
def diffusion(request) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas(request.param, T))


def test_betas_are_float64_and_match_the_papers():
    linear, cosine = make_betas("linear", T), make_betas("cosine", T)
    assert linear.dtype == cosine.dtype == torch.float64
    np.testing.assert_allclose(linear.numpy(), paper_linear_betas(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(cosine.numpy(), paper_cosine_betas(), rtol=1e-12, atol=1e-15)
    assert cosine.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_abar_T_is_close_to_zero(schedule):
    abar_T = np.prod(1 - make_betas(schedule, T).numpy())
    assert abar_T < 1e-4


def test_linear_schedule_for_other_T_keeps_abar_T_small():
    for steps in (100, 250, 4000):
        assert np.prod(1 - make_betas("linear", steps).numpy()) < 1e-3


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValueError, match="sigmoid.*linear, cosine"):
        make_betas("sigmoid")


@pytest.mark.parametrize("bad", [0, -5])
def test_non_positive_T_is_rejected(bad):
    with pytest.raises(ValueError, match=f"num_timesteps.*{bad}"):
        make_betas("linear", bad)


def test_buffers_follow_the_paper(diffusion):
    betas = diffusion.betas.numpy()
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        assert getattr(diffusion, name).dtype == torch.float64
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev.numpy(), abar_prev, rtol=1e-12)
    np.testing.assert_allclose(diffusion.sqrt_alphas_cumprod.numpy(), np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(diffusion.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(diffusion.posterior_variance.numpy(), betas * (1 - abar_prev) / (1 - abar), rtol=1e-12)


def test_posterior_is_bayes_rule_on_two_gaussians(diffusion):
    # q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) and q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t)
    betas = diffusion.betas.numpy()
    abar = np.cumprod(1 - betas)
    torch.manual_seed(0)
    x0, x_t = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    mean, var, log_var = diffusion.q_posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        alpha, prior_var = 1 - betas[ti], 1 - abar[ti - 1]
        precision = 1 / prior_var + alpha / betas[ti]
        expected_mean = np.sqrt(abar[ti - 1]) * x0[i].numpy() / prior_var + np.sqrt(alpha) * x_t[i].numpy() / betas[ti]
        expected_mean /= precision
        np.testing.assert_allclose(mean[i].numpy(), expected_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(var[i].numpy(), 1 / precision, rtol=1e-9)
        np.testing.assert_allclose(log_var[i].numpy(), np.log(1 / precision), rtol=1e-9)


def test_q_sample_moments():
    diffusion = GaussianDiffusion(make_betas("linear", T))
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    for ti in (0, 100, 500, 999):
        abar = np.prod(1 - paper_linear_betas()[: ti + 1])
        t = torch.full((x0.shape[0],), ti)
        x_t = diffusion.q_sample(
            x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(ti), dtype=torch.float64)
        )
        assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - abar, rel=2e-2, abs=1e-5)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_step_by_hand(variance):
    # Algorithm 2: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z
    diffusion = GaussianDiffusion(make_betas("linear", T), variance=variance)
    betas = paper_linear_betas()
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(1)
    x_t, eps, z = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ti = 437
    out = samplers.ddpm_step(diffusion, eps, x_t, ti, z, clip_denoised=False)
    sigma2 = betas[ti] if variance == "fixed_large" else betas[ti] * (1 - abar[ti - 1]) / (1 - abar[ti])
    expected = (x_t.numpy() - betas[ti] / np.sqrt(1 - abar[ti]) * eps.numpy()) / np.sqrt(1 - betas[ti])
    expected += np.sqrt(sigma2) * z.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_t_zero_adds_no_noise(diffusion):
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    a = samplers.ddpm_step(diffusion, eps, x_t, 0, torch.randn(3, 3, 8, 8, generator=g))
    b = samplers.ddpm_step(diffusion, eps, x_t, 0, torch.randn(3, 3, 8, 8, generator=g))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = samplers.ddpm_step(diffusion, eps, x_t, 1, torch.randn(3, 3, 8, 8, generator=g))
    assert not torch.allclose(a, c)


def test_ddim_eta_one_has_the_ddpm_posterior_variance(diffusion):
    # sigma_t^2 (eta=1, t_prev = t-1) = (1 - abar_{t-1}) / (1 - abar_t) * beta_t  (Song et al. Eq. 16 vs Ho Eq. 7)
    betas = diffusion.betas.numpy()
    abar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(3)
    x_t, eps = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    z1, z2 = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for ti in (5, 300, 900):
        a = samplers.ddim_step(diffusion, eps, x_t, ti, ti - 1, eta=1.0, noise=z1, clip_denoised=False)
        b = samplers.ddim_step(diffusion, eps, x_t, ti, ti - 1, eta=1.0, noise=z2, clip_denoised=False)
        sigma = ((a - b) / (z1 - z2)).flatten()
        expected = (1 - abar[ti - 1]) / (1 - abar[ti]) * betas[ti]
        np.testing.assert_allclose(sigma.numpy() ** 2, expected, rtol=1e-6)


def test_ddim_eta_zero_by_hand_and_final_step():
    # Song et al. Eq. 12 with sigma = 0: x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev) eps
    diffusion = GaussianDiffusion(make_betas("linear", T))
    abar = np.cumprod(1 - paper_linear_betas())
    g = torch.Generator().manual_seed(4)
    x_t, eps = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ti, tp = 800, 600
    x0 = (x_t.numpy() - np.sqrt(1 - abar[ti]) * eps.numpy()) / np.sqrt(abar[ti])
    expected = np.sqrt(abar[tp]) * x0 + np.sqrt(1 - abar[tp]) * eps.numpy()
    out = samplers.ddim_step(diffusion, eps, x_t, ti, tp, clip_denoised=False)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)
    final = samplers.ddim_step(diffusion, eps, x_t, ti, -1, clip_denoised=False)
    np.testing.assert_allclose(final.numpy(), x0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_every_objective_converts_to_the_true_eps(objective):
    diffusion = GaussianDiffusion(make_betas("cosine", T), objective=objective)
    g = torch.Generator().manual_seed(5)
    x0, noise = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.training_target(x0, t, noise)
    torch.testing.assert_close(diffusion.model_output_to_eps(target, x_t, t), noise, rtol=1e-6, atol=1e-6)
    abar = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    if objective == "v":  # Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0
        torch.testing.assert_close(target, abar.sqrt() * noise - (1 - abar).sqrt() * x0)


def test_training_loss_is_zero_for_an_oracle_and_positive_otherwise():
    diffusion = GaussianDiffusion(make_betas("linear", T))
    g = torch.Generator().manual_seed(6)
    x0, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(2))
    t = torch.tensor([3, 30, 300, 900])
    assert diffusion.training_loss(lambda x_t, t_: noise, x0, t=t, noise=noise).item() == 0.0
    zero_model = lambda x_t, t_: torch.zeros_like(x_t)  # noqa: E731
    per_example = diffusion.training_loss(zero_model, x0, t=t, noise=noise, reduction="none")
    np.testing.assert_allclose(per_example.numpy(), (noise**2).flatten(1).mean(1).numpy(), rtol=1e-6)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="fixed_huge.*fixed_large, fixed_small"):
        GaussianDiffusion(make_betas("linear", 100), variance="fixed_huge")
    with pytest.raises(ValueError, match="score.*eps, x0, v"):
        GaussianDiffusion(make_betas("linear", 100), objective="score")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sampling_timesteps(T, "euler")
    with pytest.raises(ValueError, match="steps must be in"):
        sampling_timesteps(T, "ddim", 0)


def test_sampling_timesteps():
    assert sampling_timesteps(10, "ddpm") == list(range(9, -1, -1))
    steps = sampling_timesteps(T, "ddim", 50)
    assert len(steps) == 50 and steps[0] == 999 and steps[-1] == 0 and steps == sorted(steps, reverse=True)
    quad = sampling_timesteps(T, "ddim", 50, "quadratic")
    assert len(quad) == 50 and quad[-1] == 0 and quad[1] - quad[2] > quad[-2] - quad[-1]


def _toy_model(x_t, t):
    return 0.1 * x_t + 1e-4 * t.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_is_reproducible_and_per_sample_seeds_ignore_the_batch(sampler):
    diffusion = GaussianDiffusion(make_betas("linear", 50))
    kwargs = {"sampler": SamplerConfig(sampler, 10 if sampler == "ddim" else None, eta=0.5)}
    a = sample(diffusion, _toy_model, (4, 1, 4, 4), seed=7, **kwargs)
    b = sample(diffusion, _toy_model, (4, 1, 4, 4), seed=7, **kwargs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.abs().max() <= 1.0 + 1e-6 or sampler == "ddim"
    whole = sample(diffusion, _toy_model, (4, 1, 4, 4), seeds=[10, 11, 12, 13], **kwargs)
    part = sample(diffusion, _toy_model, (2, 1, 4, 4), seeds=[12, 13], **kwargs)
    torch.testing.assert_close(whole[2:], part, rtol=0, atol=1e-6)


def test_sample_returns_the_requested_chain():
    diffusion = GaussianDiffusion(make_betas("linear", 50))
    x0, chain = sample(diffusion, _toy_model, (2, 1, 4, 4), seed=0, return_steps=[49, 25, 0, 3000])
    assert sorted(chain) == [0, 25, 49]
    assert chain[49].shape == x0.shape
    # x_T is pure N(0, I) noise from the seed
    torch.testing.assert_close(chain[49], torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0)))


def _min_snr_expected(objective: str, t: np.ndarray, gamma: float) -> np.ndarray:
    # Hang et al. 2023: SNR_t = abar_t / (1 - abar_t);
    # eps: min(SNR, g) / SNR, v: min(SNR, g) / (SNR + 1), x0: min(SNR, g)
    abar = np.cumprod(1 - paper_linear_betas())[t]
    snr = abar / (1 - abar)
    return {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1), "x0": np.minimum(snr, gamma)}[
        objective
    ]


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_min_snr_weighting_follows_hang_et_al(objective):
    gamma = 5.0
    diffusion = GaussianDiffusion(
        make_betas("linear", T), objective=objective, loss_weighting="min_snr", min_snr_gamma=gamma
    )
    plain = GaussianDiffusion(make_betas("linear", T), objective=objective)
    all_t = np.arange(T)
    assert diffusion.loss_weights.dtype == torch.float64
    np.testing.assert_allclose(diffusion.loss_weights.numpy(), _min_snr_expected(objective, all_t, gamma), rtol=1e-12)
    g = torch.Generator().manual_seed(8)
    x0, noise = (torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 20, 150, 600, 999])
    model = lambda x_t, t_: 0.3 * x_t  # noqa: E731
    weighted = diffusion.training_loss(model, x0, t=t, noise=noise, reduction="none")
    target = plain.training_target(x0, t, noise).numpy()
    x_t = plain.q_sample(x0, t, noise).numpy()
    mse = ((0.3 * x_t - target) ** 2).reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(weighted.numpy(), mse * _min_snr_expected(objective, t.numpy(), gamma), rtol=1e-5)


def test_no_loss_weighting_keeps_l_simple_exactly():
    g = torch.Generator().manual_seed(9)
    x0, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(2))
    t = torch.tensor([1, 50, 500, 999])
    model = lambda x_t, t_: 0.5 * x_t  # noqa: E731
    loss = GaussianDiffusion(make_betas("linear", T), loss_weighting="none").training_loss(model, x0, t=t, noise=noise)
    x_t = GaussianDiffusion(make_betas("linear", T)).q_sample(x0, t, noise)
    # today's L_simple: the per-example mean squared errors, averaged
    assert loss.item() == ((0.5 * x_t - noise) ** 2).flatten(1).mean(1).mean().item()
    with pytest.raises(ValueError, match="snr.*none, min_snr"):
        GaussianDiffusion(make_betas("linear", 100), loss_weighting="snr")
