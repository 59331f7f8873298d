"""The DDPM U-Net: the paper's parameter count, shapes, and the checks on its settings."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lightning.models import UNet
from ddpm_lightning.models.unet import Downsample, Upsample, timestep_embedding

pytestmark = pytest.mark.unit
SMALL = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (16,)}


def test_default_unet_has_the_papers_parameter_count():
    assert sum(p.numel() for p in UNet().parameters()) == 35_746_307


@pytest.mark.parametrize(("channels", "size", "attn"), [(3, 32, (16,)), (1, 32, (16,)), (1, 28, (14,)), (3, 64, (32,))])
def test_output_has_the_input_shape(channels, size, attn):
    net = UNet(in_channels=channels, image_size=size, **{**SMALL, "attn_resolutions": attn})
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_output_layer_starts_at_zero_and_learns_from_t():
    torch.manual_seed(0)
    net = UNet(**SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    assert net(x, torch.tensor([1, 2])).abs().max().item() == 0.0  # zero-initialised conv_out, as in Ho et al.
    for p in net.parameters():  # leave the zero init behind, as after some training
        torch.nn.init.normal_(p, std=0.05)
    a, b = net(x, torch.tensor([1, 1])), net(x, torch.tensor([1, 900]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_timestep_embedding_is_the_transformer_sinusoid():
    t, dim = torch.tensor([0, 1, 17, 999]), 128
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t.numpy()[:, None] * freqs), np.cos(t.numpy()[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(timestep_embedding(t, dim).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_image_size_the_down_sampling_cannot_handle_is_rejected():
    with pytest.raises(ValueError, match="image_size=30.*multiple of 8"):
        UNet(image_size=30)


def test_attention_resolution_that_does_not_exist_is_rejected():
    with pytest.raises(ValueError, match=r"attn_resolutions \[12\].*\[32, 16, 8, 4\]"):
        UNet(attn_resolutions=(12,))


def test_wrong_input_shape_is_rejected():
    net = UNet(**SMALL)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\).*\(B, 3, 32, 32\)"):
        net(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))


def test_groupnorm_divisibility_is_checked():
    with pytest.raises(ValueError, match="num_groups=32"):
        UNet(ch=48)


def test_upsample_equals_nearest_neighbour_upsampling_then_a_3x3_convolution():
    torch.manual_seed(0)
    up = Upsample(8).double()
    torch.nn.init.normal_(up.conv.bias)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    # the paper's definition: nearest 2x up-sampling, then a padded 3x3 convolution
    upsampled = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    expected = torch.nn.functional.conv2d(upsampled, up.conv.weight, up.conv.bias, padding=1)
    out = up(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (x, up.conv.weight))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, up.conv.weight))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_channels_last_unet_computes_the_same_function():
    torch.manual_seed(0)
    net = UNet(**SMALL).double().eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 700])
    expected = net(x, t)
    net.to(memory_format=torch.channels_last)
    out = net(x, t)  # a plain NCHW input is moved to the weights' format
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_same_downsampling_pads_the_bottom_row_and_right_column_only():
    torch.manual_seed(0)
    down = Downsample(4, "same")
    x = torch.randn(2, 4, 8, 8)
    # TF 'SAME' for a 3x3 kernel of stride 2 on an even size: output (i, j) reads input rows 2i..2i+2 and columns
    # 2j..2j+2, the row and column past the edge being zeros
    padded = torch.zeros(2, 4, 9, 9)
    padded[:, :, :8, :8] = x
    expected = torch.empty(2, 4, 4, 4)
    for i in range(4):
        for j in range(4):
            patch = padded[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # (B, C_in, 3, 3)
            expected[:, :, i, j] = torch.einsum("bckl,ockl->bo", patch, down.conv.weight) + down.conv.bias
    torch.testing.assert_close(down(x), expected)
    symmetric = Downsample(4, "symmetric")
    symmetric.load_state_dict(down.state_dict())
    torch.testing.assert_close(symmetric(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
    assert not torch.allclose(symmetric(x), down(x))


def test_the_papers_padding_and_groupnorm_eps_are_the_defaults_and_recorded():
    net = UNet(**SMALL)
    assert (net.init_args["downsample_padding"], net.init_args["norm_eps"]) == ("same", 1e-6)
    assert {m.eps for m in net.modules() if isinstance(m, nn.GroupNorm)} == {1e-6}
    old = UNet(**SMALL, downsample_padding="symmetric", norm_eps=1e-5)
    assert {m.eps for m in old.modules() if isinstance(m, nn.GroupNorm)} == {1e-5}
    assert [m.padding for m in old.modules() if isinstance(m, Downsample)] == ["symmetric"]


BAD_SETTINGS = [({"downsample_padding": "valid"}, "allowed: same, symmetric"), ({"norm_eps": 0.0}, "norm_eps must be")]


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS)
def test_bad_padding_or_eps_is_rejected(setting, message):
    with pytest.raises(ValueError, match=message):
        UNet(**SMALL, **setting)


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = UNet(**SMALL, dropout=0.0)
    with torch.no_grad():  # the zero-initialised output layers would leave the gradients before them zero
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpointed = UNet(**SMALL, dropout=0.0, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x_t, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 700])
    grads = []
    for net in (plain, checkpointed):
        net(x_t, t).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert checkpointed.init_args["grad_checkpointing"] is True


def test_scale_shift_modulates_the_second_groupnorm_with_the_embedding():
    from ddpm_lightning.models.unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(8, 16, temb_dim=12, dropout=0.0, groups=4, eps=1e-6, scale_shift=True).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert block.temb_proj.weight.shape == (32, 12)  # 2 C_out: a scale and a shift per channel
    x, temb = torch.randn(3, 8, 5, 5, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    # Dhariwal & Nichol 2021, Sec. 3: AdaGN(h, y) = y_s GroupNorm(h) + y_b, with y_s = 1 + scale
    h = F.conv2d(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight,
                 block.conv1.bias, padding=1)  # fmt: skip
    emb = F.linear(F.silu(temb), block.temb_proj.weight, block.temb_proj.bias)
    scale, shift = emb[:, :16, None, None], emb[:, 16:, None, None]
    h = F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, 1e-6) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    expected = F.conv2d(x, block.skip.weight, block.skip.bias) + h
    torch.testing.assert_close(block(x, temb), expected, rtol=1e-12, atol=1e-12)


def test_add_conditioning_is_the_default_and_keeps_the_parameters_and_init_args():
    torch.manual_seed(0)
    default = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16)
    torch.manual_seed(0)
    add = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16,
               time_conditioning="add")  # fmt: skip
    assert "time_conditioning" not in add.init_args
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), add.state_dict().values(), strict=True))
    shift = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16,
                 time_conditioning="scale_shift")  # fmt: skip
    assert shift.init_args["time_conditioning"] == "scale_shift"
    assert shift.state_dict().keys() == add.state_dict().keys()
    assert shift.down[0][0].temb_proj.out_features == 2 * add.down[0][0].temb_proj.out_features


def test_the_class_embedding_reaches_the_scale_and_shift():
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8,
               num_classes=3, time_conditioning="scale_shift").eval()  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
        assert not torch.allclose(net(x, t, y=torch.tensor([0, 0])), net(x, t, y=torch.tensor([1, 1])))


def test_an_unknown_time_conditioning_is_rejected():
    with pytest.raises(ValueError, match="unknown time_conditioning 'film'; allowed: add, scale_shift"):
        UNet(time_conditioning="film")
