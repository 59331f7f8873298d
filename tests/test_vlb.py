"""The variational bound (Ho et al. 2020, Eq. 5) and learned variances (Nichol & Dhariwal 2021), against float64
formulas written here."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from helpers import unet_spec
from torch.utils.data import DataLoader, TensorDataset

import ddpm_lightning.evaluation.nll as nll_module
from ddpm_lightning.callbacks import default_callbacks
from ddpm_lightning.cli import main
from ddpm_lightning.cli import nll as nll_command
from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    make_betas,
    normal_kl,
    samplers,
)
from ddpm_lightning.diffusion.gaussian import HYBRID_LAMBDA
from ddpm_lightning.evaluation.nll import NLLSpec, off_grid_distance, quantize_to_grid
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.sampling import load_module

pytestmark = pytest.mark.unit


def _phi(z: float) -> float:
    """The standard normal CDF, with the edge cases of +-inf."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ------------------------------------------------------------------------------------------------ normal_kl
def test_normal_kl_matches_the_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    s1, s2 = rng.uniform(0.1, 3.0, 50), rng.uniform(0.1, 3.0, 50)
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    kl = normal_kl(*(torch.tensor(a) for a in (m1, 2 * np.log(s1), m2, 2 * np.log(s2))))
    assert kl.dtype == torch.float64
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_normal_kl_matches_monte_carlo():
    m1, s1, m2, s2 = 0.3, 0.7, -0.5, 1.4
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * s1 + m1
    log_p1 = -0.5 * ((x - m1) / s1) ** 2 - math.log(s1)
    log_p2 = -0.5 * ((x - m2) / s2) ** 2 - math.log(s2)
    estimate = (log_p1 - log_p2).mean().item()
    kl = normal_kl(torch.tensor(m1, dtype=torch.float64), 2 * math.log(s1), m2, 2 * math.log(s2)).item()
    assert kl == pytest.approx(estimate, abs=3e-3)


def test_normal_kl_is_zero_for_equal_gaussians():
    mean, logvar = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert torch.equal(normal_kl(mean, logvar, mean, logvar), torch.zeros(10, dtype=torch.float64))


# ------------------------------------------------------------------------------- the discretized decoder L_0
GRID = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)  # x = 2 k / 255 - 1


@pytest.mark.parametrize("mean, scale", [(0.0, 0.1), (0.9, 0.01), (-3.0, 0.5), (5.0, 2.0), (0.123, 1e-4), (0.0, 30.0)])
def test_the_256_bins_sum_to_one(mean, scale):
    log_p = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, math.log(scale))
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_inner_bins_and_open_ended_edge_bins():
    mean, scale = 0.2, 0.3
    log_p = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, math.log(scale))
    ).numpy()
    # edge bins: (-inf, -1 + 1/255] and [1 - 1/255, inf)
    assert math.exp(log_p[0]) == pytest.approx(_phi((-1 + 1 / 255 - mean) / scale), rel=1e-10)
    assert math.exp(log_p[255]) == pytest.approx(1 - _phi((1 - 1 / 255 - mean) / scale), rel=1e-9)
    for k in (1, 100, 128, 254):
        x = 2 * k / 255 - 1
        expected = _phi((x + 1 / 255 - mean) / scale) - _phi((x - 1 / 255 - mean) / scale)
        assert math.exp(log_p[k]) == pytest.approx(expected, rel=1e-9)


def test_far_tail_bins_keep_their_precision():
    # a bin 20 standard deviations above the mean: Phi(b) - Phi(a) cancels to 0 in float64, the tail form does not
    x = torch.tensor([0.5], dtype=torch.float64)
    scale = 0.02
    log_p = discretized_gaussian_log_likelihood(
        x, torch.tensor([0.1], dtype=torch.float64), torch.tensor([math.log(scale)])
    )
    upper, lower = (0.4 + 1 / 255) / scale, (0.4 - 1 / 255) / scale
    # log of the upper-tail mass difference, with the asymptotic Q(z) ~ phi(z) / z (1 - 1/z^2 + 3/z^4)
    q = lambda z: math.exp(-z * z / 2) / (z * math.sqrt(2 * math.pi)) * (1 - 1 / z**2 + 3 / z**4)  # noqa: E731
    assert log_p.item() == pytest.approx(math.log(q(lower) - q(upper)), rel=1e-3)


# ------------------------------------------------------------------------------------------------ the bound
T_SMALL = 100
M, S = 0.1, 0.4  # the data: N(M, S^2) per pixel, rounded to the 8-bit grid


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    betas = make_betas("linear", T_SMALL).numpy()
    abar = np.cumprod(1 - betas)
    return betas, abar, np.append(1.0, abar[:-1])


def _gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * S + M
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _exact_model(objective: str, var_values=None):
    """The exact denoiser of N(M, S^2) data: E[x_0 | x_t] = M + a S^2 / (a^2 S^2 + b^2) (x_t - a M), a = sqrt(abar_t),
    b = sqrt(1 - abar_t), given as the objective's output (and the variance channels, when given)."""
    _, abar, _ = _tables()

    def model(x_t, t):
        a = torch.from_numpy(np.sqrt(abar))[t].reshape(-1, 1, 1, 1)
        b = torch.from_numpy(np.sqrt(1 - abar))[t].reshape(-1, 1, 1, 1)
        x_t = x_t.double()
        x0 = M + a * S**2 / (a**2 * S**2 + b**2) * (x_t - a * M)
        eps = (x_t - a * x0) / b
        out = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[objective]
        return out if var_values is None else torch.cat([out, var_values(t, x_t)], dim=1)

    return model


def _expected_term(variance: str, x0: np.ndarray, x_t: np.ndarray, t: int) -> np.ndarray:
    """L_{t-1} (t > 0): KL(N(mu~(x0), beta~) || N(mu~(x0_hat), sigma^2)); t = 0: -log P(bin of x0) under
    N(x0_hat, beta~_1); per image, in bits per dimension."""
    betas, abar, abar_prev = _tables()
    a, b = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
    x0_hat = M + a * S**2 / (a**2 * S**2 + b**2) * (x_t - a * M)
    post_var = betas * (1 - abar_prev) / (1 - abar)
    if t == 0:
        std = math.sqrt(post_var[1])
        upper = np.where(x0 > 1 - 1 / 255, np.inf, (x0 + 1 / 255 - x0_hat) / std)
        lower = np.where(x0 < -1 + 1 / 255, -np.inf, (x0 - 1 / 255 - x0_hat) / std)
        phi = np.vectorize(_phi)
        nll = -np.log(phi(upper) - phi(lower))
        return nll.reshape(x0.shape[0], -1).mean(1) / math.log(2)
    coef1 = betas[t] * math.sqrt(abar_prev[t]) / (1 - abar[t])
    sigma2 = betas[t] if variance == "fixed_large" else post_var[t]
    kl = 0.5 * (np.log(sigma2 / post_var[t]) + post_var[t] / sigma2 + (coef1 * (x0 - x0_hat)) ** 2 / sigma2 - 1)
    return kl.reshape(x0.shape[0], -1).mean(1) / math.log(2)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_terms_with_the_exact_eps_equal_the_analytic_kls(variance, objective):
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL), variance=variance, objective=objective)
    x0 = _gaussian_data(4)
    g = torch.Generator().manual_seed(1)
    for t in (0, 1, 10, 50, 99):
        tt = torch.full((4,), t)
        x_t = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        terms = diffusion.vb_terms_bpd(_exact_model(objective)(x_t, tt), x0, x_t, tt)
        expected = _expected_term(variance, x0.numpy(), x_t.numpy(), t)
        np.testing.assert_allclose(terms.numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "learned, var_values, fixed",
    [
        ("learned_range", lambda t, x: torch.ones_like(x), "fixed_large"),  # Eq. 15 with v = 1: beta_t
        ("learned_range", lambda t, x: -torch.ones_like(x), "fixed_small"),  # v = 0: beta~_t
        (
            "learned",
            lambda t, x: torch.log(make_betas("linear", T_SMALL))[t].reshape(-1, 1, 1, 1).expand_as(x),
            "fixed_large",
        ),  # fmt: skip
    ],
)
def test_learned_variances_at_their_ends_are_the_fixed_ones(learned, var_values, fixed):
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL), variance=learned)
    x0 = _gaussian_data(3)
    t = torch.tensor([1, 40, 99])
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=x0.dtype))
    terms = diffusion.vb_terms_bpd(_exact_model("eps", var_values)(x_t, t), x0, x_t, t)
    expected = np.stack(
        [_expected_term(fixed, x0[i : i + 1].numpy(), x_t[i : i + 1].numpy(), int(t[i])) for i in range(3)]
    )
    np.testing.assert_allclose(terms.numpy(), expected.ravel(), rtol=1e-9)
    # Eq. 15 directly: log sigma^2 = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2
    betas, abar, abar_prev = _tables()
    v = torch.full((3, 1, 8, 8), 0.3, dtype=torch.float64)
    log_var = GaussianDiffusion(make_betas("linear", T_SMALL), variance="learned_range").log_variance(v, x_t, t)
    post_log_var = np.log(betas[1:] * (1 - abar_prev[1:]) / (1 - abar[1:]))  # beta~_0 = 0: t > 0 only
    expected_log_var = 0.65 * np.log(betas[t.numpy()]) + 0.35 * post_log_var[t.numpy() - 1]
    np.testing.assert_allclose(log_var[:, 0, 0, 0].numpy(), expected_log_var, rtol=1e-12)


def _entropy_bits_per_dim() -> float:
    """H of the discretized N(M, S^2) data: -sum_k P_k log2 P_k over the 256 bins (open-ended edges)."""
    edges = [-math.inf] + [2 * k / 255 - 1 + 1 / 255 for k in range(255)] + [math.inf]
    P = np.array([_phi((edges[k + 1] - M) / S) - _phi((edges[k] - M) / S) for k in range(256)])
    P = P[P > 0]
    return float(-(P * np.log2(P)).sum())


@pytest.mark.parametrize("clip", [True, False])
def test_the_total_bound_upper_bounds_the_true_nll(clip):
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL), variance="fixed_small")
    x0 = _gaussian_data(128, seed=3)
    out = diffusion.calc_bpd_loop(_exact_model("eps"), x0, clip_denoised=clip)
    total = out["total_bpd"]
    torch.testing.assert_close(total, out["prior_bpd"] + out["vb"].sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["decoder_bpd"], out["vb"][:, 0])
    bound, stderr = total.mean().item(), total.std().item() / math.sqrt(len(total))
    entropy = _entropy_bits_per_dim()
    assert bound - 3 * stderr > entropy
    assert bound < entropy + 2.5  # not loose beyond reason (T = 100 steps: a coarse chain)


def test_the_prior_term_is_the_kl_to_the_standard_normal():
    _, abar, _ = _tables()
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL))
    x0 = _gaussian_data(2)
    a2 = abar[-1]
    kl = 0.5 * (-np.log(1 - a2) + (1 - a2) + a2 * x0.numpy() ** 2 - 1)
    np.testing.assert_allclose(diffusion.prior_bpd(x0).numpy(), kl.reshape(2, -1).mean(1) / math.log(2), rtol=1e-10)


def test_sampled_timesteps_estimate_the_sum_without_bias_and_ignore_the_batching():
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL), variance="fixed_small")
    x0 = _gaussian_data(4, seed=4)
    model = _exact_model("eps")
    out = diffusion.calc_bpd_loop(model, x0, t_samples=7, seeds=[10, 11, 12, 13])
    assert out["vb"].shape == (4, 8) and bool((out["timesteps"][:, 0] == 0).all())
    assert all(len(set(row[1:].tolist())) == 7 and row[1:].min() >= 1 for row in out["timesteps"])
    torch.testing.assert_close(out["rest_bpd"], out["vb"][:, 1:].sum(1) * (T_SMALL - 1) / 7)
    part = diffusion.calc_bpd_loop(model, x0[2:], t_samples=7, seeds=[12, 13])
    torch.testing.assert_close(part["total_bpd"], out["total_bpd"][2:], rtol=0, atol=0)
    # over many draws the estimate's mean is the full sum's
    full = diffusion.calc_bpd_loop(model, x0[:1].expand(64, -1, -1, -1))["total_bpd"]
    sampled = diffusion.calc_bpd_loop(model, x0[:1].expand(64, -1, -1, -1), t_samples=20)["total_bpd"]
    se = math.sqrt(full.var().item() / 64 + sampled.var().item() / 64)
    assert abs(full.mean().item() - sampled.mean().item()) < 4 * se


# ------------------------------------------------------------------------------------------- learned variances
@pytest.mark.parametrize("loss_weighting", ["none", "min_snr"])
def test_l_hybrid_trains_the_variance_through_l_vlb_and_the_mean_through_l_simple(loss_weighting):
    diffusion = GaussianDiffusion(
        make_betas("linear", T_SMALL), variance="learned_range", loss_weighting=loss_weighting
    )
    g = torch.Generator().manual_seed(5)
    x0, noise = _gaussian_data(4), torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 50, 99])
    output = (0.5 * torch.randn(4, 2, 8, 8, generator=g)).requires_grad_()  # (B, 2C): mean | variance channels
    diffusion.training_loss(lambda x_t, t_: output, x0, t=t, noise=noise).backward()
    mean_grad, var_grad = output.grad[:, :1], output.grad[:, 1:]
    # L_simple alone: d/d mean of mean_b(w_b mean_d((out - eps)^2)) = 2 w_b (out - eps) / (B D)
    weights = diffusion.loss_weights[t].reshape(-1, 1, 1, 1)
    expected_mean_grad = 2 * weights * (output[:, :1].detach().double() - noise) / (4 * 64)
    torch.testing.assert_close(mean_grad.double(), expected_mean_grad, rtol=1e-5, atol=1e-9)
    # lambda T L_vlb alone, on the variance channels, with the mean held fixed; no min-SNR weight
    var_values = output[:, 1:].detach().requires_grad_()
    x_t = diffusion.q_sample(x0.float(), t, noise.float())
    vb = diffusion.vb_terms_bpd(torch.cat([output[:, :1].detach(), var_values], 1), x0.float(), x_t, t)
    (HYBRID_LAMBDA * T_SMALL * vb).mean().backward()
    torch.testing.assert_close(var_grad, var_values.grad, rtol=1e-5, atol=1e-9)
    assert var_grad.abs().sum() > 0


def test_the_split_is_the_one_the_loss_and_the_samplers_use():
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL), variance="learned")
    output = torch.arange(2 * 4 * 3 * 3, dtype=torch.float64).reshape(2, 4, 3, 3)
    mean_output, var_values = diffusion.split_output(output)
    assert torch.equal(mean_output, output[:, :2]) and torch.equal(var_values, output[:, 2:])
    prediction = diffusion.predict(lambda x_t, t: output, output[:, :2], torch.tensor([3, 4]))
    assert torch.equal(prediction.var_values, output[:, 2:].float())
    with pytest.raises(ValueError, match="twice the image channels"):
        diffusion.split_output(torch.zeros(1, 3, 2, 2))
    assert GaussianDiffusion(make_betas("linear", T_SMALL)).split_output(output) == (output, None)


def test_the_ancestral_step_uses_the_learned_variance_and_the_strided_one_its_respaced_range():
    diffusion = GaussianDiffusion(make_betas("linear", T_SMALL), variance="learned_range")
    betas, abar, abar_prev = _tables()
    g = torch.Generator().manual_seed(6)
    x_t, eps, z = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    v = torch.full_like(x_t, 0.5)  # frac = 0.75
    a = samplers.ddpm_step(diffusion, eps, x_t, 40, z * 0, clip_denoised=False, var_values=v)
    b = samplers.ddpm_step(diffusion, eps, x_t, 40, z, clip_denoised=False, var_values=v)
    post_var = betas * (1 - abar_prev) / (1 - abar)
    sigma2 = np.exp(0.75 * np.log(betas[40]) + 0.25 * np.log(post_var[40]))
    np.testing.assert_allclose(((b - a) / z).numpy(), math.sqrt(sigma2), rtol=1e-9)
    # a sub-chain S: beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}},
    # beta~'_i = (1 - abar_{S_{i-1}}) / (1 - abar_{S_i}) beta'_i
    S = [0, 30, 60, 99]
    respaced = diffusion.respaced(S)
    a = samplers.ddpm_step(respaced, eps, x_t, 2, z * 0, clip_denoised=False, var_values=v)
    b = samplers.ddpm_step(respaced, eps, x_t, 2, z, clip_denoised=False, var_values=v)
    beta_r = 1 - abar[60] / abar[30]
    post_r = (1 - abar[30]) / (1 - abar[60]) * beta_r
    np.testing.assert_allclose(
        ((b - a) / z).numpy(), math.sqrt(math.exp(0.75 * math.log(beta_r) + 0.25 * math.log(post_r))), rtol=1e-9
    )


# ------------------------------------------------------------------------------------- the module and `ddpm nll`
def _tiny(variance: str = "learned_range", net=None) -> DiffusionModule:
    if net is None:
        unet = unet_spec(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
        return DiffusionModule(net=unet, num_timesteps=50, variance=variance, lr_schedule={"warmup_steps": 1})
    return DiffusionModule(net, num_timesteps=50, variance=variance, lr_schedule={"warmup_steps": 1})


class _SameChannels(torch.nn.Module):
    in_channels, image_size = 1, 8

    def forward(self, x_t, t):
        return x_t


def test_the_module_checks_the_networks_channels_against_the_variance():
    with pytest.raises(ValueError, match=r"variance='learned_range' needs \(1, 2, 8, 8\).*twice the image channels"):
        _tiny("learned_range", net=_SameChannels())
    assert _tiny("fixed_large", net=_SameChannels()).diffusion.variance == "fixed_large"
    # the default U-Net is built with twice the channels
    assert _tiny("learned").net.out_channels == 2


def test_the_module_passes_the_loss_weighting_to_the_diffusion_and_its_hyper_parameters():
    module = DiffusionModule(net=_SameChannels(), num_timesteps=50, loss_weighting={"name": "min_snr", "gamma": 3.0})
    assert (module.diffusion.loss_weighting, module.diffusion.min_snr_gamma) == ("min_snr", 3.0)
    assert module.hparams.loss_weighting == {"name": "min_snr", "gamma": 3.0}
    assert float(module.diffusion.loss_weights.max()) <= 1.0  # eps: min(SNR, 3) / SNR


@pytest.mark.integration
@pytest.mark.slow  # a Trainer.fit, every sampler and the command: minutes on 2 busy cores
def test_a_learned_variance_model_trains_checkpoints_samples_and_has_a_bpd(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    module = _tiny("learned_range")
    data = torch.round((torch.rand(16, 1, 8, 8) * 2 - 1 + 1) * 127.5) / 127.5 - 1
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=3,
        logger=False,
        callbacks=default_callbacks(0.5, progress_bar=False),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=8))
    ckpt = tmp_path / "learned.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = load_module(ckpt)
    assert loaded.diffusion.variance == "learned_range" and loaded.net.out_channels == 2
    for sampler in ({"name": "ddpm"}, {"name": "ddpm", "steps": 5}, {"name": "ddim", "steps": 5, "eta": 1.0},
                    {"name": "dpmpp_2m", "steps": 5}):  # fmt: skip
        images = loaded.sample(2, sampler)
        assert images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images).all())
    # `ddpm nll` reads it back (on digits made 8x8 and 1-channel by a stand-in data set)
    monkeypatch.setattr(nll_module, "real_images", lambda *a: TensorDataset(data))
    out = tmp_path / "nll.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["nll", "--ckpt", str(ckpt), "--num", "4", "--t-samples", "3", "--out", str(out)])
    assert exit_info.value.code == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 4 and not report["quantized"] and report["bpd"] > 0
    assert report["bpd"] == pytest.approx(sum(v["bpd"] for v in report["terms"].values()), rel=1e-9)
    # data off the 8-bit grid: refused when asked, else quantized and reported
    monkeypatch.setattr(nll_module, "real_images", lambda *a: TensorDataset(data + 0.3 / 255))
    with pytest.raises(SystemExit) as exit_info:
        main(["nll", "--ckpt", str(ckpt), "--num", "2", "--t-samples", "2", "--off-grid", "refuse", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "not on the 8-bit grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nll", "--ckpt", str(ckpt), "--num", "2", "--t-samples", "2", "--out", str(out)])
    assert json.loads(out.read_text())["quantized"] and "were quantized" in capsys.readouterr().out


def test_the_8_bit_grid_check_and_quantization():
    grid = torch.linspace(-1, 1, 256).reshape(1, 1, 16, 16)
    assert off_grid_distance(grid) < 1e-4
    shifted = grid + 0.4 / 127.5
    assert off_grid_distance(shifted) == pytest.approx(0.4, abs=1e-4)
    torch.testing.assert_close(quantize_to_grid(grid + 0.3 / 127.5), grid, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"off_grid": "round"}, "unknown off_grid 'round'; allowed: quantize, refuse"),
        ({"num": 0}, "num must be a positive number of images, got 0"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"data": "no/such/folder"}, "data 'no/such/folder' is neither cifar10 nor digits nor a folder of images"),
        ({"split": "all"}, "split 'all' is for a folder of images; digits has: train, test"),
    ],
)
def test_an_nll_spec_refuses_a_bad_value_naming_it(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NLLSpec(**{"ckpt": "m.ckpt"} | fields)


def test_the_command_line_builds_the_nll_spec_of_the_python_call(tmp_path) -> None:
    argv = ["--ckpt", "run/last.ckpt", "--num", "0", "--t-samples", "4", "--no-clip", "--data", "cifar10"]
    spec = NLLSpec("run/last.ckpt", data="cifar10", num=None, t_samples=4, clip_denoised=False, progress=True,
                   out="run/last.nll.json")  # fmt: skip
    assert nll_command.spec_of(nll_command.build_parser().parse_args(argv)) == spec
