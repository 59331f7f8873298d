"""A sampler added from this file alone (one step factory, its own options, one register call) is a setting like the
built-in ones: checked, labelled, counted, run by the one loop and taken by the module."""

from dataclasses import dataclass

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, SamplerConfig, make_betas, sample, samplers
from ddpm_lightning.diffusion.samplers import Chain, Evaluate, SamplerOptions, Step, core, register
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class JumpOptions(SamplerOptions):
    """How far each step goes toward the x_0 prediction (1: all the way, as DDIM with eta 0)."""

    reach: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.reach <= 1:
            raise ValueError(f"reach must be in (0, 1], got {self.reach}")

    def label(self) -> str:
        return f"_reach{self.reach:g}" if self.reach != 1 else ""


def _jump(chain: Chain) -> Step:
    """x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps from the network's eps at the visited timestep."""
    diffusion, timesteps, reach = chain.diffusion, chain.timesteps, chain.config.options.reach

    def step(i: int, x_t: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        t = torch.full((x_t.shape[0],), timesteps[i], device=x_t.device)
        eps = evaluate(x_t, timesteps[i]).eps
        x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
        if i + 1 == len(timesteps):
            return x0
        abar_next = float(diffusion.alphas_cumprod[timesteps[i + 1]])
        target = abar_next**0.5 * x0 + (1 - abar_next) ** 0.5 * eps
        return x_t + reach * (target - x_t)

    return step


@pytest.fixture
def jump(monkeypatch):
    monkeypatch.setattr(core, "_REGISTRY", dict(core._REGISTRY))  # registered for this test only
    return register("jump", _jump, options=JumpOptions)


def _oracle(diffusion: GaussianDiffusion, x0: torch.Tensor):
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()).float()

    return model


def test_a_sampler_from_a_test_file_is_a_checked_and_labelled_setting(jump):
    assert "jump" in samplers.registered()
    config = SamplerConfig.parse({"name": "jump", "steps": 10, "reach": 0.5})
    assert config.options == JumpOptions(0.5) and config.spacing == "uniform"
    assert config.label(100) == "jump10_reach0.5" and config.nfe(100) == 10
    assert config.to_dict()["reach"] == 0.5
    assert SamplerConfig.parse("ddim", config) == SamplerConfig("ddim", 10)
    with pytest.raises(ValueError, match="reach must be in"):
        SamplerConfig("jump", reach=2.0)
    with pytest.raises(ValueError, match="reach apply to the jump sampler only, not to ddim"):
        SamplerConfig("ddim", reach=0.5)


def test_a_sampler_from_a_test_file_recovers_x0_from_an_oracle_through_the_one_loop(jump):
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    x0 = torch.rand((2, 1, 4, 4), generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    calls = []
    out = sample(diffusion, _oracle(diffusion, x0), x0.shape, sampler=SamplerConfig("jump", 5), seed=0,
                 progress=calls.append)  # fmt: skip
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert calls == [1] * 5


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x_t)


def test_a_module_samples_with_a_sampler_from_a_test_file(jump):
    settings = {"net": _Conv(), "image_size": 8, "in_channels": 1, "num_timesteps": 50}
    module = DiffusionModule(**settings, sampler={"name": "jump", "steps": 4})
    assert module.sampler_config.name == "jump"
    assert module.sample(2, seed=0).shape == (2, 1, 8, 8)
