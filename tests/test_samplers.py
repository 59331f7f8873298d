"""The samplers (ancestral DDPM on full and strided chains, DDIM, DPM-Solver++(2M)) against float64 formulas from the
papers, oracle models that know x0 and a Gaussian toy problem whose exact eps-predictor is closed form; and the
module's default sampler settings."""

import math

import numpy as np
import pytest
import torch
from helpers import flat

from ddpm_lightning.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    SamplerConfig,
    make_betas,
    sample,
    samplers,
    sampling_timesteps,
)
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.unit
T = 1000


def linear_abar(T: int = T) -> np.ndarray:
    return np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def oracle(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """A model that knows x0: it returns the objective's target for the eps that x_t implies,
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (Eq. 4 solved for eps)."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0_64 = x0.to(torch.float64)
        abar = diffusion.alphas_cumprod[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t.to(torch.float64) - abar.sqrt() * x0_64) / (1 - abar).sqrt()
        return diffusion.training_target(x0_64, t, eps).float()

    return model


def gaussian_eps_model(diffusion: GaussianDiffusion, mu: float, s: float):
    """The exact E[eps | x_t] when x0 ~ N(mu, s^2) per coordinate: x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) and
    eps, x_t are jointly Gaussian with Cov(eps, x_t) = sqrt(1 - abar), so
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = diffusion.alphas_cumprod[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        eps = (1 - abar).sqrt() * (x_t.to(torch.float64) - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)
        return eps.float()

    return model


def _x0(shape: tuple[int, ...] = (3, 1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9  # inside [-1, 1]


# ------------------------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("step", ["ddim_eta1", "ddpm_fixed_small"])
@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_ddim_eta_one_step_has_the_ancestral_mean_and_variance(step, t):
    # Ho et al. Eq. 11 and Eq. 7: mean (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), variance beta~_t;
    # DDIM (Song et al. Eq. 12, 16) with eta = 1 and t_prev = t - 1 must give both
    diffusion = GaussianDiffusion(make_betas("linear", T), variance="fixed_small")
    betas = np.linspace(1e-4, 0.02, T)
    abar = linear_abar()
    g = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mean = (x_t.numpy() - betas[t] / np.sqrt(1 - abar[t]) * eps.numpy()) / np.sqrt(1 - betas[t])
    variance = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
    if step == "ddim_eta1":
        draw = [
            samplers.ddim_step(diffusion, eps, x_t, t, t - 1, eta=1.0, noise=n, clip_denoised=False) for n in (0 * z, z)
        ]
    else:
        draw = [samplers.ddpm_step(diffusion, eps, x_t, t, n, clip_denoised=False) for n in (0 * z, z)]
    np.testing.assert_allclose(draw[0].numpy(), mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(((draw[1] - draw[0]) / z).numpy() ** 2, variance, rtol=1e-7)


def test_ddim_eta_one_on_the_full_chain_is_the_fixed_small_ancestral_sampler():
    diffusion = GaussianDiffusion(make_betas("cosine", 100), variance="fixed_small")
    model = gaussian_eps_model(diffusion, 0.2, 0.5)
    ddpm = sample(diffusion, model, (64, 2), sampler="ddpm", seed=3)
    ddim = sample(
        diffusion, model, (64, 2), sampler=SamplerConfig("ddim", eta=1.0), seed=3
    )  # the same noise, draw for draw
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-4)


def test_dpmpp_2m_step_by_hand():
    # Lu et al. 2022, Algorithm 2, with lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t))
    diffusion = GaussianDiffusion(make_betas("linear", T))
    abar = linear_abar()
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha / sigma)
    g = torch.Generator().manual_seed(1)
    x_t, x0, x0_prev = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t_prev, t, t_next = 700, 600, 450
    h, h_prev = lam[t_next] - lam[t], lam[t] - lam[t_prev]
    r = h_prev / h
    D = (1 + 1 / (2 * r)) * x0.numpy() - 1 / (2 * r) * x0_prev.numpy()
    expected = sigma[t_next] / sigma[t] * x_t.numpy() - alpha[t_next] * (np.exp(-h) - 1) * D
    out = samplers.dpmpp_2m_step(diffusion, x0, x_t, t, t_next, x0_prev=x0_prev, t_prev=t_prev)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_dpmpp_first_order_step_is_the_ddim_step_and_the_last_step_returns_x0():
    diffusion = GaussianDiffusion(make_betas("cosine", T))
    g = torch.Generator().manual_seed(2)
    x_t, x0 = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    eps = diffusion.predict_eps_from_x0(x_t, torch.full((2,), 800), x0)
    ddim = samplers.ddim_step(diffusion, eps, x_t, 800, 300, clip_denoised=False)
    torch.testing.assert_close(samplers.dpmpp_2m_step(diffusion, x0, x_t, 800, 300), ddim, rtol=1e-9, atol=1e-9)
    assert samplers.dpmpp_2m_step(diffusion, x0, x_t, 5, -1, x0_prev=x_t, t_prev=20) is x0


# ------------------------------------------------------------------------------------------------ respacing
def test_respaced_betas_keep_abar_on_the_kept_timesteps():
    # Nichol & Dhariwal 2021, Sec. 4: beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}}, beta~'_i from Eq. 7 on them
    for variance in ("fixed_large", "fixed_small"):
        diffusion = GaussianDiffusion(make_betas("linear", T), variance=variance)
        S = sampling_timesteps(T, "ddpm", 10)[::-1]
        respaced = diffusion.respaced(S)
        abar = linear_abar()[S]
        betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
        assert respaced.betas.dtype == torch.float64 and respaced.variance == variance
        np.testing.assert_allclose(respaced.betas.numpy(), betas, rtol=1e-12)
        np.testing.assert_allclose(respaced.alphas_cumprod.numpy(), abar, rtol=1e-12)
        posterior = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
        np.testing.assert_allclose(respaced.posterior_variance[1:].numpy(), posterior, rtol=1e-12)


def test_ddpm_on_all_timesteps_is_the_full_chain():
    diffusion = GaussianDiffusion(make_betas("linear", 50))
    model = gaussian_eps_model(diffusion, 0.0, 0.5)
    full = sample(diffusion, model, (8, 2), seed=0)
    torch.testing.assert_close(
        sample(diffusion, model, (8, 2), sampler=SamplerConfig(steps=50), seed=0), full, rtol=0, atol=0
    )
    assert not torch.equal(sample(diffusion, model, (8, 2), sampler=SamplerConfig(steps=49), seed=0), full)


# ------------------------------------------------------------------------------------------------ oracles
def test_ddim_eta_zero_draws_only_x_T():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    g = torch.Generator().manual_seed(4)
    sample(diffusion, oracle(diffusion, _x0()), (3, 1, 8, 8), sampler=SamplerConfig("ddim", 20), generator=g)
    after_x_T = torch.Generator().manual_seed(4)
    torch.randn((3, 1, 8, 8), generator=after_x_T)
    assert torch.equal(g.get_state(), after_x_T.get_state())


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("num_steps", [1, 7, 50, T])
def test_deterministic_samplers_recover_x0_from_an_oracle(sampler, num_steps, objective):
    diffusion = GaussianDiffusion(make_betas("linear", T), objective=objective)
    x0 = _x0()
    for spacing in ("uniform", "quadratic"):
        config = SamplerConfig(sampler, num_steps, spacing=spacing)
        out = sample(diffusion, oracle(diffusion, x0), x0.shape, sampler=config, seed=5, clip_denoised=False)
        torch.testing.assert_close(out, x0, rtol=0, atol=2e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_step_evaluates_the_model_as_often_as_its_setting_counts(sampler):
    diffusion = GaussianDiffusion(make_betas("cosine", 100))
    config = SamplerConfig(sampler, 13)
    calls, per_step = [], []

    def model(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    sample(diffusion, model, (2, 3), sampler=config, seed=0, progress=per_step.append)
    assert len(calls) == sum(per_step) == config.nfe(100) == (25 if sampler == "heun" else 13)
    assert per_step == ([2] * 12 + [1] if sampler == "heun" else [1] * 13)
    starts = [calls[i] for i in np.cumsum([0, *per_step[:-1]])]  # the first evaluation of each step
    assert starts == config.visited(diffusion)
    if sampler != "heun":
        assert calls == sampling_timesteps(100, sampler, 13)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_returns_its_chain_and_is_reproducible_per_sample(sampler):
    # per-sample seeds: the same samples in any batch, so on 1 or N processes
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    model = gaussian_eps_model(diffusion, 0.1, 0.3)
    config = SamplerConfig(
        sampler, 10, eta=0.5 if sampler == "ddim" else 0.0, S_churn=5.0 if sampler == "heun" else 0.0
    )
    kwargs = {"sampler": config}
    visited = config.visited(diffusion)
    x0, chain = sample(diffusion, model, (4, 1, 2, 2), seeds=[0, 1, 2, 3], return_steps=visited, **kwargs)
    assert sorted(chain, reverse=True) == sorted(set(visited), reverse=True) and chain[visited[-1]].shape == x0.shape
    x_T = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chain[visited[0]][1:2], x_T)
    part = sample(diffusion, model, (2, 1, 2, 2), seeds=[2, 3], **kwargs)
    torch.testing.assert_close(x0[2:], part, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ toy problem
MU, S, NUM = 0.3, 0.2, 20_000


def _moment_error(samples: torch.Tensor) -> float:
    return abs(samples.mean().item() - MU) + abs(samples.std().item() - S)


@pytest.mark.parametrize(
    ("sampler", "spacing"), [("ddpm", "uniform"), ("ddim", "uniform"), ("ddim", "quadratic"), ("dpmpp_2m", "uniform")]
)
def test_samples_of_an_exact_model_approach_the_data_as_the_steps_grow(sampler, spacing):
    diffusion = GaussianDiffusion(make_betas("linear", T), variance="fixed_small")
    model = gaussian_eps_model(diffusion, MU, S)
    errors = {
        n: _moment_error(sample(diffusion, model, (NUM, 1), sampler=SamplerConfig(sampler, n, spacing=spacing), seed=0))
        for n in (5, 20, T)
    }
    assert errors[T] < errors[20] < errors[5]
    assert errors[T] < 0.01  # about 3 standard errors of the moments of 20k draws


def test_ddim_is_first_order_and_dpmpp_2m_second_order_on_the_probability_flow_ode():
    # for x0 ~ N(mu, s^2) the probability-flow ODE maps x_T to x0 = mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 +
    # sigma_T^2): it keeps the Gaussian marginals and is increasing, so it standardises
    diffusion = GaussianDiffusion(make_betas("cosine", T))
    model = gaussian_eps_model(diffusion, MU, S)
    alpha_T = math.sqrt(float(diffusion.alphas_cumprod[-1]))
    errors = {}
    for sampler in ("ddim", "dpmpp_2m"):
        for n in (20, 40, 80):
            x0, chain = sample(diffusion, model, (2000, 1), sampler=SamplerConfig(sampler, n), seed=0,
                               clip_denoised=False, return_steps=[T - 1])  # fmt: skip
            exact = MU + S * (chain[T - 1] - alpha_T * MU) / math.sqrt(alpha_T**2 * S**2 + 1 - alpha_T**2)
            errors[sampler, n] = (x0 - exact).abs().max().item()
    assert 3 < errors["ddim", 20] / errors["ddim", 80] < 5  # error ~ 1 / steps
    assert errors["dpmpp_2m", 20] / errors["dpmpp_2m", 80] > 10  # error ~ 1 / steps^2 (16) once steps are small
    assert errors["dpmpp_2m", 40] < errors["ddim", 80]


def test_dpmpp_2m_leaves_out_t_zero_and_ends_at_about_T_over_the_steps():
    assert sampling_timesteps(T, "dpmpp_2m", 10) == np.round(np.linspace(0, T - 1, 11))[:0:-1].astype(int).tolist()
    assert sampling_timesteps(T, "dpmpp_2m", T) == list(range(T - 1, -1, -1))
    assert sampling_timesteps(T, "ddim", 10)[-1] == sampling_timesteps(T, "ddpm", 10)[-1] == 0


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [0, -3, T + 1])
def test_step_counts_outside_one_to_T_are_rejected_naming_the_range(bad):
    diffusion = GaussianDiffusion(make_betas("linear", T))
    for sampler in SAMPLERS:
        with pytest.raises(
            ValueError, match=rf"steps must be (in \[1, {T}\].*{sampler}, got {bad}|a positive .*, got {bad})"
        ):
            sample(diffusion, lambda x, t: x, (1, 2), sampler={"name": sampler, "steps": bad})


def test_unknown_sampler_and_spacing_list_the_allowed_ones():
    diffusion = GaussianDiffusion(make_betas("cosine", 10))
    with pytest.raises(ValueError, match="unknown sampler 'euler'; allowed: ddpm, ddim, dpmpp_2m"):
        sample(diffusion, lambda x, t: x, (1, 2), sampler="euler")
    with pytest.raises(ValueError, match="unknown spacing 'log'; allowed: uniform, quadratic"):
        sample(diffusion, lambda x, t: x, (1, 2), sampler={"name": "ddim", "steps": 5, "spacing": "log"})
    with pytest.raises(ValueError, match="eta must be >= 0, got -1"):
        sample(diffusion, lambda x, t: x, (1, 2), sampler={"name": "ddim", "eta": -1})


def test_lambda_is_the_log_snr():
    diffusion = GaussianDiffusion(make_betas("cosine", T))
    alpha, sigma, lam = samplers.alpha_sigma_lambda(diffusion, 400)
    abar = float(diffusion.alphas_cumprod[400])
    assert (alpha**2, sigma**2) == pytest.approx((abar, 1 - abar), rel=1e-12)
    assert 2 * lam == pytest.approx(math.log(abar / (1 - abar)), rel=1e-12)


# ------------------------------------------------------------------------------------------------ the setting
def test_sampler_config_labels_name_the_sampler_and_its_network_evaluations():
    assert SamplerConfig("ddim", 50).label(T) == "ddim50"
    assert SamplerConfig("ddim", 50, eta=1.0).label(T) == "ddim50_eta1"
    assert SamplerConfig("ddim", 50, spacing="quadratic").label(T) == "ddim50_quad"
    assert SamplerConfig("dpmpp_2m", 20).label(T) == "dpmpp_2m20"
    assert SamplerConfig().label(T) == "ddpm1000"  # the full chain


def test_sampler_config_parse_keeps_unset_fields_of_the_base():
    base = SamplerConfig("ddim", 50, spacing="quadratic")
    assert SamplerConfig.parse(None, base) == base
    assert SamplerConfig.parse("dpmpp_2m", base) == SamplerConfig("dpmpp_2m", 50, spacing="quadratic")
    assert SamplerConfig.parse("ddpm", base, steps=10, eta=None) == SamplerConfig("ddpm", 10, spacing="quadratic")
    assert SamplerConfig.parse({"name": "ddim", "steps": 5}) == SamplerConfig("ddim", 5)


# ------------------------------------------------------------------------------------------------ module defaults
def _module(**kwargs) -> DiffusionModule:
    return DiffusionModule(**flat(in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                           num_timesteps=100, **kwargs))  # fmt: skip


def test_module_sampler_setting_and_its_deprecated_flat_aliases():
    module = _module(sampler="ddim", sample_steps=50, sample_spacing="quadratic")
    assert module.sampler_config == SamplerConfig("ddim", 50, spacing="quadratic")
    assert module.hparams.sampler == {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": "quadratic"}
    assert "sample_steps" not in module.hparams  # checkpoints store the setting, not the aliases
    assert module.sampler_config_for("dpmpp_2m") == SamplerConfig("dpmpp_2m", 50, spacing="quadratic")
    assert module.sampler_config_for("ddpm", steps=10).nfe(100) == 10
    assert _module(sampler={"name": "ddpm", "steps": 25}).sampler_config.nfe(100) == 25
    assert _module(sampler="ddpm").sampler_config.nfe(100) == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "dpmpp_2m", "sample_steps": 101}, r"steps must be in \[1, 100\].*got 101"),
        ({"sampler": {"name": "ddpm", "steps": 101}}, r"steps must be in \[1, 100\].*got 101"),
        ({"sampler": "ddpm", "sample_steps": 0}, r"steps must be a positive number .* got 0"),
        ({"sampler": "euler"}, "allowed: ddpm, ddim, dpmpp_2m"),
        ({"sample_spacing": "log"}, "allowed: uniform, quadratic"),
    ],
)
def test_module_rejects_bad_sampler_settings_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


# ------------------------------------------------------------------------------------------------ sigma view
def test_sigmas_are_the_variance_exploding_view_of_the_process():
    # x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t = sqrt(1 / abar_t - 1)
    diffusion = GaussianDiffusion(make_betas("linear", T))
    expected = np.sqrt(1 / linear_abar() - 1)
    assert diffusion.sigmas.dtype == torch.float64
    np.testing.assert_allclose(diffusion.sigmas.numpy(), expected, rtol=1e-12)
    grid = torch.tensor(expected[[0, 10, 500, 999]])
    assert diffusion.timestep_of_sigma(grid).tolist() == [0, 10, 500, 999]
    # between two grid points: the nearest by |sigma - sigma_t|
    a, b = expected[500], expected[501]
    for sigma in (a + 0.4 * (b - a), a + 0.6 * (b - a)):
        assert int(diffusion.timestep_of_sigma(torch.tensor(sigma))) == (500 if sigma - a < b - sigma else 501)
    assert float(diffusion.round_sigma(torch.tensor(1e6))) == pytest.approx(expected[-1], rel=1e-12)
    assert float(diffusion.round_sigma(torch.tensor(1e-9))) == pytest.approx(expected[0], rel=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_karras_sigmas_follow_eq_5_rounded_to_the_schedule_with_sigma_max_capped_at_80(schedule):
    diffusion = GaussianDiffusion(make_betas(schedule, T))
    sigmas = np.sqrt(1 / np.cumprod(1 - make_betas(schedule, T).numpy()) - 1)
    assert sigmas[-1] > 80  # linear ~157, cosine ~2e4: both capped
    rho, n = 7.0, 18
    ramp = np.linspace(0, 1, n)
    raw = (80 ** (1 / rho) + ramp * (sigmas[0] ** (1 / rho) - 80 ** (1 / rho))) ** rho
    rounded = sigmas[[np.abs(sigmas - s).argmin() for s in raw]]
    got = samplers.karras_sigmas(diffusion, n, rho)
    np.testing.assert_allclose(got.numpy(), rounded, rtol=1e-12)
    assert got[0] == pytest.approx(80, rel=0.02) and got[-1] == sigmas[0]
    assert samplers.karras_sigmas(diffusion, n, rho, sigma_max=10.0)[0] == pytest.approx(10, rel=0.02)


# ------------------------------------------------------------------------------------------------ Heun
def gaussian_denoiser(mu: float, s: float):
    """D(x; sigma) = E[x0 | x0 + sigma n = x] for x0 ~ N(mu, s^2): (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""
    return lambda x, sigma: (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)


def test_the_first_heun_step_is_algorithm_1_in_float64():
    # Karras et al. 2022, Algorithm 1, lines 1-8 with the exact denoiser of Gaussian data, written out in float64;
    # the sampler runs the network at the rounded sigmas' timesteps on x_t = x / sqrt(1 + sigma^2)
    diffusion = GaussianDiffusion(make_betas("cosine", T))
    n = 6
    levels = samplers.karras_sigmas(diffusion, n).numpy()
    s0, s1 = levels[0], levels[1]
    z = torch.randn((5, 1), generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    D = gaussian_denoiser(MU, S)
    x = s0 * z  # line 1: x_0 ~ N(0, sigma_0^2 I)
    d = (x - D(x, s0)) / s0  # line 4
    x1 = x + (s1 - s0) * d  # line 5
    d1 = (x1 - D(x1, s1)) / s1  # line 7
    x1 = x + (s1 - s0) * (0.5 * d + 0.5 * d1)  # line 8
    config = SamplerConfig("heun", n)
    visited = config.visited(diffusion)
    _, chain = sample(diffusion, gaussian_eps_model(diffusion, MU, S), (5, 1), sampler=config, seed=7,
                      clip_denoised=False, return_steps=visited[:2])  # fmt: skip
    np.testing.assert_allclose(chain[visited[0]].numpy(), z, rtol=1e-6)
    np.testing.assert_allclose(chain[visited[1]].double().numpy(), x1 / np.sqrt(1 + s1**2), rtol=1e-5, atol=1e-6)


def test_heun_step_is_the_trapezoidal_rule_and_euler_to_sigma_zero():
    D = gaussian_denoiser(0.1, 0.4)
    x = torch.tensor([[0.7], [-2.0]], dtype=torch.float64)
    d, d1 = (x - D(x, 3.0)) / 3.0, None
    euler = x + (1.5 - 3.0) * d
    d1 = (euler - D(euler, 1.5)) / 1.5
    torch.testing.assert_close(samplers.heun_step(D, x, 3.0, 1.5), x - 1.5 * (d + d1) / 2, rtol=1e-14, atol=0)
    torch.testing.assert_close(samplers.heun_step(D, x, 0.02, 0.0), D(x, 0.02), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("num_steps", [1, 5, 18])
def test_heun_recovers_x0_from_an_oracle(num_steps, objective):
    diffusion = GaussianDiffusion(make_betas("cosine", T), objective=objective)
    x0 = _x0()
    config = SamplerConfig("heun", num_steps)
    out = sample(diffusion, oracle(diffusion, x0), x0.shape, sampler=config, seed=5, clip_denoised=False)
    torch.testing.assert_close(out, x0, rtol=0, atol=2e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_heun_is_second_order_on_the_probability_flow_ode(schedule):
    # in the sigma view Gaussian data x0 ~ N(mu, s^2) flow as x(sigma) = mu + (x(sigma_0) - mu) sqrt((s^2 + sigma^2) /
    # (s^2 + sigma_0^2)); starting from x = sigma_0 x_T the exact sample is mu + s (sigma_0 x_T - mu) / sqrt(s^2 +
    # sigma_0^2). Error ~ 1 / N^2: about 4 times smaller when the steps double
    diffusion = GaussianDiffusion(make_betas(schedule, T))
    model = gaussian_eps_model(diffusion, MU, S)
    errors = {}
    for n in (8, 16, 32):
        config = SamplerConfig("heun", n)
        s0 = float(samplers.karras_sigmas(diffusion, n)[0])
        x0, chain = sample(diffusion, model, (2000, 1), sampler=config, seed=0, clip_denoised=False,
                           return_steps=config.visited(diffusion)[:1])  # fmt: skip
        x_T = next(iter(chain.values())).double()
        exact = MU + S * (s0 * x_T - MU) / math.sqrt(S**2 + s0**2)
        errors[n] = (x0.double() - exact).abs().max().item()
    assert 3 < errors[8] / errors[16] < 5.5 and 3 < errors[16] / errors[32] < 5.5


def test_heun_without_churn_draws_only_x_T_and_with_churn_is_seeded_per_sample():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    model = gaussian_eps_model(diffusion, 0.1, 0.3)
    g = torch.Generator().manual_seed(4)
    sample(diffusion, model, (3, 1, 4, 4), sampler=SamplerConfig("heun", 8), generator=g)
    after_x_T = torch.Generator().manual_seed(4)
    torch.randn((3, 1, 4, 4), generator=after_x_T)
    assert torch.equal(g.get_state(), after_x_T.get_state())
    churn = SamplerConfig("heun", 8, S_churn=20.0, S_tmin=0.05, S_tmax=50.0)
    a = sample(diffusion, model, (4, 1, 4, 4), sampler=churn, seeds=[0, 1, 2, 3])
    torch.testing.assert_close(sample(diffusion, model, (2, 1, 4, 4), sampler=churn, seeds=[2, 3]), a[2:])
    assert not torch.allclose(a, sample(diffusion, model, (4, 1, 4, 4), sampler="heun", seeds=[0, 1, 2, 3]))


def test_heun_settings_count_evaluations_and_are_checked():
    config = SamplerConfig("heun", 10)
    assert config.spacing == "karras" and config.nfe(T) == 19 and config.label(T) == "heun19"
    assert SamplerConfig("heun", 10, S_churn=40).label(T) == "heun19_churn40"
    assert SamplerConfig("heun", 1).nfe(T) == 1
    assert config.to_dict()["S_churn"] == 0.0 and "S_churn" not in SamplerConfig("ddim", 5).to_dict()
    # a name keeps what applies: heun takes its own spacing, another sampler drops Heun's settings
    assert SamplerConfig.parse("heun", SamplerConfig("ddim", 20, spacing="quadratic")) == SamplerConfig("heun", 20)
    assert SamplerConfig.parse("ddim", SamplerConfig("heun", 20, S_churn=3)) == SamplerConfig("ddim", 20)
    with pytest.raises(ValueError, match="spacing 'uniform' is not one of heun's; allowed: karras"):
        SamplerConfig("heun", 10, spacing="uniform")
    with pytest.raises(ValueError, match="spacing 'karras' is not one of ddim's; allowed: uniform, quadratic"):
        SamplerConfig("ddim", 10, spacing="karras")
    with pytest.raises(ValueError, match="S_churn apply to the heun sampler only, not to ddpm"):
        SamplerConfig("ddpm", 10, S_churn=1.0)
    with pytest.raises(ValueError, match="S_churn >= 0.*got S_churn=-1"):
        SamplerConfig("heun", 10, S_churn=-1.0)


# ------------------------------------------------------------------------------------------------ autoguidance
def _eps_model(scale: float):
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * torch.tanh(x_t) * (1 + t.float().reshape(-1, 1) / 100)

    return model


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_autoguidance_with_w_one_is_the_unguided_model_bit_for_bit(sampler):
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    guide = samplers.Guide(diffusion, _eps_model(0.3))
    config = SamplerConfig(sampler, 6)
    plain = sample(diffusion, _eps_model(0.9), (4, 2), sampler=config, seed=1)
    assert torch.equal(sample(diffusion, _eps_model(0.9), (4, 2), sampler=config, seed=1, guide=guide), plain)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_model_that_guides_itself_is_the_unguided_model(sampler):
    diffusion = GaussianDiffusion(make_betas("cosine", 100))
    config = SamplerConfig(sampler, 6)
    plain = sample(diffusion, _eps_model(0.9), (4, 2), sampler=config, seed=1)
    guided = SamplerConfig(sampler, 6, autoguidance_scale=2.5)
    out = sample(
        diffusion, _eps_model(0.9), (4, 2), sampler=guided, seed=1, guide=samplers.Guide(diffusion, _eps_model(0.9))
    )
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_autoguidance_combines_eps_whatever_each_model_predicts():
    # the guide predicts x0, the main model eps: the samplers must step with eps_g + w (eps_m - eps_g), eps_g being the
    # eps that the guide's x0 implies (Eq. 4), which is D_g + w (D_m - D_g) in x0
    process = make_betas("linear", 100)
    main, guide_x0 = GaussianDiffusion(process), GaussianDiffusion(process, objective="x0")
    eps_main, eps_guide, w = _eps_model(0.9), _eps_model(0.2), 3.0

    def guide_model(x_t, t):  # the x0 whose implied eps is eps_guide
        return guide_x0.predict_x0_from_eps(x_t, t, eps_guide(x_t, t))

    def combined(x_t, t):
        return eps_guide(x_t, t) + w * (eps_main(x_t, t) - eps_guide(x_t, t))

    for sampler in ("ddim", "heun"):
        config = SamplerConfig(sampler, 5)
        expected = sample(main, combined, (4, 2), sampler=config, seed=2, clip_denoised=False)
        out = sample(main, eps_main, (4, 2), sampler=SamplerConfig(sampler, 5, autoguidance_scale=w), seed=2,
                     clip_denoised=False, guide=samplers.Guide(guide_x0, guide_model))  # fmt: skip
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_autoguidance_refuses_another_process_and_a_missing_guide():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    config = SamplerConfig("ddim", 5, autoguidance_scale=2.0)
    assert config.nfe(100) == 10 and config.label(100) == "ddim5-ag2"
    for other, match in [(make_betas("linear", 50), "guide has T = 50, the model T = 100"),
                         (make_betas("cosine", 100), "another noise schedule")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            sample(
                diffusion,
                _eps_model(1),
                (1, 2),
                sampler=config,
                guide=samplers.Guide(GaussianDiffusion(other), _eps_model(1)),
            )
    with pytest.raises(ValueError, match="autoguidance_scale=2 needs a guide model"):
        sample(diffusion, _eps_model(1), (1, 2), sampler=config)
    with pytest.raises(ValueError, match="use one kind of guidance at a time"):
        SamplerConfig("ddim", 5, guidance_scale=3.0, autoguidance_scale=2.0)


def test_return_steps_records_the_nearest_visited_level_under_its_own_key():
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    model = gaussian_eps_model(diffusion, 0.1, 0.3)
    config = SamplerConfig("dpmpp_2m", 10)  # ends at t = 10 and steps straight to the clean data: t = 0 is not visited
    visited = config.visited(diffusion)
    assert 0 not in visited and visited[-1] == 10
    _, chain = sample(diffusion, model, (2, 1), sampler=config, seed=0, return_steps=[0, 52, 99])
    assert sorted(chain) == [10, 50, 99]  # the nearest visited timesteps stand for 0, 52 and 99
    assert samplers.nearest_visited([0, 52, 99], visited) == {10: 0, 50: 52, 99: 99}
