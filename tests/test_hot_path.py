"""The training step's hot path runs float32 maths only."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_lightning.diffusion import GaussianDiffusion, make_betas
from ddpm_lightning.models import UNet

pytestmark = pytest.mark.unit


class _DtypeRecorder(TorchDispatchMode):
    """Records every operator that reads or writes a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.float64_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [x for x in (*args, *(kwargs or {}).values(), *(out if isinstance(out, tuple) else (out,)))]
        if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in tensors):
            self.float64_ops.append(str(func))
        return out


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_a_float32_training_step_runs_no_float64_kernel(objective):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_betas("cosine", 100), objective=objective)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
    x0 = torch.randn(4, 1, 16, 16)
    with _DtypeRecorder() as recorder:
        diffusion.training_loss(net, x0).backward()
    assert recorder.float64_ops == []


def test_float32_coefficients_are_the_float64_schedule_rounded_once():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    abar = torch.cumprod(1 - make_betas("linear", 1000), dim=0)
    assert diffusion.sqrt_alphas_cumprod_f32.dtype == torch.float32
    torch.testing.assert_close(diffusion.sqrt_alphas_cumprod_f32, abar.sqrt().float(), rtol=0, atol=0)
    torch.testing.assert_close(diffusion.sqrt_one_minus_alphas_cumprod_f32, (1 - abar).sqrt().float(), rtol=0, atol=0)
    # float64 inputs keep the float64 tables (the maths tests rely on it)
    x0, t, eps = torch.ones(2, 1, 1, 1, dtype=torch.float64), torch.tensor([0, 999]), torch.zeros(2, 1, 1, 1)
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps.double()).flatten(), abar.sqrt()[[0, 999]])


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_the_training_loss_traces_into_one_graph_for_torch_compile(objective):
    """A graph break would split what ``torch.compile`` fuses (and, with CUDA graphs, add launches per step)."""
    torch._dynamo.reset()
    diffusion = GaussianDiffusion(make_betas("cosine", 100), objective=objective)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
    net.to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(diffusion.training_loss)(net, torch.randn(2, 1, 16, 16))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
