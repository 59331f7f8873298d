"""The DDPM U-Net (Ho et al. 2020, Appendix B), a PixelCNN++-style backbone with a sinusoidal time embedding.

The default configuration is the CIFAR-10 network of the paper: 35,746,307 parameters. With ``num_classes`` it is
class-conditional: a learned class embedding is added to the time embedding (as in improved-diffusion / ADM). The
residual blocks take the embedding by addition (the paper) or as a per-channel scale and shift of their second
normalisation (``time_conditioning="scale_shift"``, AdaGN: Dhariwal & Nichol 2021, Sec. 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm_lightning import compat


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, as in Ho et al.'s ``get_timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # (B, dim)


def check_labels(network: str, num_classes: int | None, y: torch.Tensor | None, batch: int) -> None:
    """ValueError unless ``y`` fits ``network`` (``"U-Net"``, ``"MPUNet"``): none for an unconditional one, a (batch,)
    tensor for one conditional on ``num_classes`` classes."""
    if num_classes is None:
        if y is not None:
            raise ValueError(f"this {network} is unconditional (num_classes=None): it takes no labels y")
    elif y is None or y.shape != (batch,):
        got = None if y is None else tuple(y.shape)
        raise ValueError(
            f"this {network} is conditional (num_classes={num_classes}): give labels y of shape ({batch},), got {got}"
        )


def _init(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """Ho et al.'s variance-scaling init (fan_avg, uniform); scale 0 zero-initialises output layers."""
    if scale == 0:
        nn.init.zeros_(module.weight)
    else:
        fan_in, fan_out = compat.fan_in_and_fan_out(module.weight)
        bound = math.sqrt(3 * scale / ((fan_in + fan_out) / 2))
        nn.init.uniform_(module.weight, -bound, bound)
    nn.init.zeros_(module.bias)


DownsamplePadding = Literal["same", "symmetric"]
DOWNSAMPLE_PADDINGS: tuple[DownsamplePadding, ...] = ("same", "symmetric")
TimeConditioning = Literal["add", "scale_shift"]
TIME_CONDITIONINGS: tuple[TimeConditioning, ...] = ("add", "scale_shift")


def _conv3x3(c_in: int, c_out: int, scale: float = 1.0, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding)
    _init(conv, scale)
    return conv


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, then GroupNorm -> SiLU -> dropout -> conv.

    ``scale_shift``: the embedding is projected to 2 C_out features (scale, shift) that modulate the second
    GroupNorm, h = GroupNorm(h) (1 + scale) + shift, before its SiLU (AdaGN, Dhariwal & Nichol 2021, Sec. 3)."""

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int, eps: float, scale_shift: bool = False
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = _conv3x3(c_in, c_out)
        self.temb_proj = nn.Linear(temb_dim, 2 * c_out if scale_shift else c_out)
        _init(self.temb_proj)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(c_out, c_out, scale=0.0)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        if isinstance(self.skip, nn.Conv2d):
            _init(self.skip)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        _init(self.qkv)
        _init(self.proj_out, scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Learned 2x down-sampling: a stride-2 3x3 convolution.

    ``padding="same"`` pads one row and column at the bottom and right only, as TensorFlow's 'SAME' padding of Ho et
    al.'s code (and diffusers' ``downsample_padding=0``) does for an even size; ``"symmetric"`` pads one on every side.
    """

    def __init__(self, channels: int, padding: DownsamplePadding = "same"):
        super().__init__()
        self.padding = padding
        self.conv = _conv3x3(channels, channels, stride=2, padding=1 if padding == "symmetric" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


# Row k of _UPSAMPLE_FOLD says which taps of a 3x3 kernel act on the input pixel at offset k of a stride-2 4x4
# transposed convolution: see Upsample.
_UPSAMPLE_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class Upsample(nn.Module):
    """2x nearest-neighbour up-sampling followed by a 3x3 convolution, computed without the up-sampled map.

    Output row 2i reads input rows (i-1, i, i) through the kernel rows (w0, w1, w2), output row 2i+1 reads (i, i, i+1):
    the composite is a stride-2 transposed convolution whose 4-tap kernel is (w2, w1+w2, w0+w1, w0) along each axis.
    Same parameters (``conv``) and the same function as ``conv(interpolate(x))`` up to float rounding, with 16 instead
    of 36 multiply-adds per input pixel and channel pair.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)
        # not persistent: a constant, checkpoints keep only ``conv``
        self.register_buffer("fold", torch.tensor(_UPSAMPLE_FOLD), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # conv weight (out, in, 3, 3) -> transposed-conv weight (in, out, 4, 4)
        kernel = torch.einsum("pk,ql,oikl->iopq", self.fold, self.fold, self.conv.weight)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


class UNet(nn.Module):
    """Noise-prediction U-Net: ``UNet()(x_t, t) -> eps`` with x_t (B, C, H, W) and integer t (B,); a conditional one
    is called as ``UNet(num_classes=K)(x_t, t, y=labels)``.

    Args:
        in_channels: image channels (3 for CIFAR-10, 1 for digits; None: 3); ``out_channels`` defaults to the same.
            A preset leaves the shape out: ``ddpm fit`` sets it from the data.
        ch: base width; the time embedding has 4 * ch features.
        ch_mult: width multiplier per resolution level; every level but the last halves the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes (in pixels) that get a self-attention block after each residual block.
        dropout: dropout rate inside the residual blocks (0.1 for CIFAR-10).
        image_size: input height and width, needed to place attention and to check the down-sampling (None: 32).
        num_groups: GroupNorm groups (32 in the paper); ``ch * mult`` must be divisible by it.
        num_classes: None: unconditional (the paper). K: labels y in 0..K-1 select a learned embedding added to the
            time embedding; y = K is the "null" class of classifier-free guidance (Ho & Salimans 2021), whose
            embedding starts at zero, so that the untrained null class is the unconditional network.
        downsample_padding: ``"same"`` (the paper's TensorFlow padding: bottom and right only) or ``"symmetric"``
            (one pixel on every side, the setting of checkpoints written before it was recorded).
        norm_eps: GroupNorm's epsilon (1e-6 in the paper's code and diffusers; 1e-5, torch's default, in checkpoints
            written before it was recorded).
        grad_checkpointing: recompute each block's activations during the backward pass instead of keeping them
            (activation checkpointing): much less memory in training for about a third more compute; same function.
        time_conditioning: how a residual block takes the time (and class) embedding: ``"add"`` (the paper: added
            to the features after the first convolution) or ``"scale_shift"`` (AdaGN, Dhariwal & Nichol 2021: a
            per-channel scale and shift of the second GroupNorm; the embedding projections are twice as wide).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        image_size: int | None = None,
        out_channels: int | None = None,
        num_groups: int = 32,
        num_classes: int | None = None,
        downsample_padding: DownsamplePadding = "same",
        norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
        time_conditioning: TimeConditioning = "add",
    ):
        super().__init__()
        in_channels = 3 if in_channels is None else in_channels
        image_size = 32 if image_size is None else image_size
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        self._check(in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, num_groups)
        bad_classes = isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        if num_classes is not None and bad_classes:
            raise ValueError(f"num_classes must be a positive integer or None (unconditional), got {num_classes!r}")
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"unknown downsample_padding {downsample_padding!r}; allowed: {', '.join(DOWNSAMPLE_PADDINGS)}"
            )
        if time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(
                f"unknown time_conditioning {time_conditioning!r}; allowed: {', '.join(TIME_CONDITIONINGS)}"
            )
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        # what rebuilds this network: checkpoints store it as the class_path and these init_args
        self.init_args = {
            "in_channels": in_channels,
            "ch": ch,
            "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn_resolutions),
            "dropout": dropout,
            "image_size": image_size,
            "out_channels": out_channels,
            "num_groups": num_groups,
            "downsample_padding": downsample_padding,
            "norm_eps": float(norm_eps),
            "grad_checkpointing": grad_checkpointing,
        }
        if num_classes is not None:
            # absent for an unconditional network, so that its init_args (and checkpoints) stay as they were
            self.init_args["num_classes"] = num_classes
        if time_conditioning != "add":
            self.init_args["time_conditioning"] = time_conditioning  # likewise absent for the paper's
        self.num_classes = num_classes
        self.grad_checkpointing = grad_checkpointing
        self.in_channels = in_channels
        self.image_size = image_size
        self.out_channels = out_channels or in_channels
        temb_dim = 4 * ch
        self.ch = ch
        scale_shift = time_conditioning == "scale_shift"

        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        _init(self.temb[0])
        _init(self.temb[2])
        self.conv_in = _conv3x3(in_channels, ch)

        # down path: remember the width of every feature map kept for a skip connection
        self.down = nn.ModuleList()
        skip_channels = [ch]
        c, res = ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(c, ch * mult, temb_dim, dropout, num_groups, norm_eps, scale_shift)])
                c = ch * mult
                if res in attn_resolutions:
                    block.append(AttnBlock(c, num_groups, norm_eps))
                self.down.append(block)
                skip_channels.append(c)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(c, downsample_padding)]))
                skip_channels.append(c)
                res //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, temb_dim, dropout, num_groups, norm_eps, scale_shift),
                AttnBlock(c, num_groups, norm_eps),
                ResBlock(c, c, temb_dim, dropout, num_groups, norm_eps, scale_shift),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList(
                    [ResBlock(c + skip_channels.pop(), ch * mult, temb_dim, dropout, num_groups, norm_eps, scale_shift)]
                )
                c = ch * mult
                if res in attn_resolutions:
                    block.append(AttnBlock(c, num_groups, norm_eps))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(c)]))
                res *= 2

        self.norm_out = nn.GroupNorm(num_groups, c, eps=norm_eps)
        self.conv_out = _conv3x3(c, self.out_channels, scale=0.0)
        if num_classes is not None:
            # made last, so that every other weight is drawn as for the unconditional network of the same seed
            self.class_emb = nn.Embedding(num_classes + 1, temb_dim)  # (K + 1, 4ch); row K: the null class
            with torch.no_grad():
                self.class_emb.weight[num_classes].zero_()

    @staticmethod
    def _check(in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size, num_groups) -> None:
        if in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if not ch_mult or any(m <= 0 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty list of positive integers, got {list(ch_mult)}")
        for mult in ch_mult:
            if (ch * mult) % num_groups:
                raise ValueError(f"ch * mult = {ch * mult} is not divisible by num_groups={num_groups} (GroupNorm)")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size <= 0 or image_size % factor:
            raise ValueError(
                f"image_size={image_size} cannot be halved {len(ch_mult) - 1} times by ch_mult={list(ch_mult)}: "
                f"it must be a positive multiple of {factor}"
            )
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        unknown = [r for r in attn_resolutions if r not in resolutions]
        if unknown:
            raise ValueError(
                f"attn_resolutions {unknown} are not feature-map sizes of this U-Net; allowed: {resolutions}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps (or the objective's output) for x_t (B, C, H, W), t (B,) and, for a conditional network, labels y
        (B,) in 0..num_classes (num_classes: the null class)."""
        if x.shape[1] != self.in_channels or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the U-Net's "
                f"(B, {self.in_channels}, {self.image_size}, {self.image_size})"
            )
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            # a U-Net moved to channels_last (faster convolutions) runs in that format whatever the input's layout
            x = x.contiguous(memory_format=torch.channels_last)
        temb = self.temb(timestep_embedding(t, self.ch).to(self.temb[0].weight.dtype))  # (B, 4ch)
        check_labels("U-Net", self.num_classes, y, x.shape[0])
        if self.num_classes is not None:
            # (B, 4ch), as in ADM: the class embedding joins the time embedding (and so its scale and shift)
            temb = temb + self.class_emb(y)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            for layer in block:
                h = self._run(layer, h, temb)
            skips.append(h)
        for layer in self.mid:
            h = self._run(layer, h, temb)
        for block in self.up:
            for layer in block:
                h = self._run(layer, torch.cat([h, skips.pop()], dim=1) if isinstance(layer, ResBlock) else h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _run(self, layer: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """One block (the residual blocks take the time embedding), recomputed in the backward pass when
        ``grad_checkpointing`` is on in training."""
        args = (h, temb) if isinstance(layer, ResBlock) else (h,)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)
