"""The magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 2-3 and App. B), as a network of this template: ``MPUNet()(x_t, t) -> output``.

Every layer keeps the magnitude (RMS) of unit-variance, uncorrelated inputs, so that activations and weights neither
grow nor shrink during training (their config D: FID 6.96 -> 3.75 on ImageNet-512):

- convolutions and linears without biases, with *forced weight normalisation*: each output channel's weight is
  stored at unit RMS (norm sqrt(fan_in)), renormalised after every optimizer step (:meth:`MPUNet.normalize_weights_`,
  called by ``DiffusionModule``), and used as w / ||w|| (unit norm) in the forward pass, where the normalisation is
  differentiable (Eq. 46-47);
- ``mp_silu(x) = silu(x) / 0.596`` (0.596: the RMS of silu on N(0, 1));
- residual joins ``mp_sum(a, b, t) = lerp(a, b, t) / sqrt((1 - t)^2 + t^2)`` and a magnitude-preserving concatenation
  for the skips (``mp_cat``);
- pixel norm (unit RMS over the channels of each pixel) in the encoder instead of group norm;
- cosine attention (queries, keys and values normalised per head);
- a constant-ones input channel, the output gain and the per-block embedding gains initialised at 0;
- the noise and class embeddings through magnitude-preserving linears.

The integer timestep t enters through the sinusoidal embedding of the DDPM U-Net scaled by sqrt(2) (unit RMS), as
EDM2's Fourier features of the noise level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_lightning.models.unet import check_labels, timestep_embedding

__all__ = ["MPConv", "MPUNet", "mp_cat", "mp_silu", "mp_sum", "normalize"]

#: the RMS of silu(x) for x ~ N(0, 1): mp_silu divides by it
SILU_RMS = 0.596


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit RMS over ``dim`` (every dimension but the first when None): x / (eps + RMS(x))."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude for unit-variance input (EDM2 Eq. 81)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, scaled to keep the magnitude of uncorrelated unit inputs (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """The channel concatenation of a and b with shares (1 - t) and t of the output's magnitude (EDM2 Eq. 103)."""
    n_a, n_b = a.shape[1], b.shape[1]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(n_a) * (1 - t)), b * (scale / math.sqrt(n_b) * t)], dim=1)


class MPConv(nn.Module):
    """A bias-free convolution (``kernel`` k: k x k) or linear (``kernel`` 0) with forced weight normalisation."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 0):
        super().__init__()
        self.c_out = c_out
        shape = (c_out, c_in, kernel, kernel) if kernel else (c_out, c_in)
        self.weight = nn.Parameter(torch.randn(shape))

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalisation: every output channel's stored weight back to unit RMS (EDM2 Eq. 47)."""
        self.weight.copy_(normalize(self.weight.float()).to(self.weight.dtype))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = normalize(self.weight.float())  # differentiable: the gradient is orthogonal to the weight
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)  # unit norm per output channel, times the gain
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class MPBlock(nn.Module):
    """EDM2's residual block (Fig. 21): an encoder block pixel-normalises its (projected) input, a decoder block
    projects its skip; the embedding scales the features by 1 + gain * linear(emb); optional cosine attention."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        c_emb: int,
        *,
        decoder: bool,
        resample: str = "keep",
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ):
        super().__init__()
        self.decoder, self.resample, self.c_out = decoder, resample, c_out
        self.takes_skip = False  # a decoder block that joins a skip connection first (set by MPUNet)
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.num_heads = max(c_out // channels_per_head, 1) if attention else 0
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(c_in if decoder else c_out, c_out, 3)
        self.emb_linear = MPConv(c_emb, c_out)
        self.conv_res1 = MPConv(c_out, c_out, 3)
        self.conv_skip = MPConv(c_in, c_out, 1) if c_in != c_out else None
        self.dropout = nn.Dropout(dropout)
        if self.num_heads:
            self.attn_qkv = MPConv(c_out, 3 * c_out, 1)
            self.attn_proj = MPConv(c_out, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if not self.decoder:
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C_out)
        y = self.dropout(mp_silu(y * scale[:, :, None, None].to(y.dtype)))
        y = self.conv_res1(y)
        if self.decoder and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine attention: queries, keys and values normalised over each head's channels (EDM2 App. B.7)."""
        B, C, H, W = x.shape
        qkv = self.attn_qkv(x).reshape(B, self.num_heads, -1, 3, H * W)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # (B, heads, C/heads, HW)
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        y = torch.einsum("nhqk,nhck->nhcq", weights, v)
        return self.attn_proj(y.reshape(B, C, H, W))


class MPUNet(nn.Module):
    """EDM2's magnitude-preserving U-Net: ``MPUNet()(x_t, t)``, a conditional one ``MPUNet(num_classes=K)(x_t, t,
    y=labels)`` (label K: the null class of classifier-free guidance, which adds no class embedding).

    Args:
        in_channels, image_size: the image shape (None: 3 and 32; ``ddpm fit`` sets them from the data).
        out_channels: output channels (None: ``in_channels``).
        ch: base width; level i has ``ch * ch_mult[i]`` channels, the embedding ``ch * max(ch_mult)``.
        ch_mult: width multiplier per resolution level; every level but the first starts with a down-sampling block.
        num_blocks: residual blocks per level in the encoder (one more in the decoder).
        attn_resolutions: feature-map sizes (pixels) whose blocks have cosine self-attention.
        mid_attention: self-attention in the first decoder block of the lowest resolution (EDM2: always).
        channels_per_head: attention channels per head.
        dropout: dropout inside the residual blocks.
        num_classes: None: unconditional. K: labels 0..K-1 through a magnitude-preserving linear of their one-hot.
        res_balance, attn_balance, concat_balance, label_balance: the t of the residual, attention, skip and
            label joins (EDM2: 0.3, 0.3, 0.5, 0.5).
        clip_act: activations clamped to [-clip_act, clip_act] after every block (None: no clamp).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        image_size: int | None = None,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        mid_attention: bool = True,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        num_classes: int | None = None,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        concat_balance: float = 0.5,
        label_balance: float = 0.5,
        clip_act: float | None = 256.0,
    ):
        super().__init__()
        in_channels = 3 if in_channels is None else in_channels
        image_size = 32 if image_size is None else image_size
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], [int(r) for r in attn_resolutions]
        _check(in_channels, image_size, ch, ch_mult, num_blocks, attn_resolutions, dropout, num_classes)
        self.init_args = {
            "in_channels": in_channels,
            "image_size": image_size,
            "out_channels": out_channels,
            "ch": ch,
            "ch_mult": ch_mult,
            "num_blocks": num_blocks,
            "attn_resolutions": attn_resolutions,
            "mid_attention": mid_attention,
            "channels_per_head": channels_per_head,
            "dropout": dropout,
            "num_classes": num_classes,
            "res_balance": res_balance,
            "attn_balance": attn_balance,
            "concat_balance": concat_balance,
            "label_balance": label_balance,
            "clip_act": clip_act,
        }
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.out_channels = out_channels or in_channels
        self.ch, self.concat_balance, self.label_balance = ch, concat_balance, label_balance
        widths = [ch * m for m in ch_mult]
        c_emb = max(widths)
        block = {"channels_per_head": channels_per_head, "dropout": dropout, "res_balance": res_balance,
                 "attn_balance": attn_balance, "clip_act": clip_act}  # fmt: skip

        self.emb_noise = MPConv(ch, c_emb)
        self.emb_label = MPConv(num_classes, c_emb) if num_classes is not None else None
        self.out_gain = nn.Parameter(torch.zeros([]))

        c_out = self._build_encoder(in_channels + 1, widths, c_emb, image_size, num_blocks, attn_resolutions, block)
        c_out = self._build_decoder(
            c_out, widths, c_emb, image_size, num_blocks, attn_resolutions, mid_attention, block
        )
        self.out_conv = MPConv(c_out, self.out_channels, 3)

    def _build_encoder(
        self, c_out: int, widths: list[int], c_emb: int, image_size: int, num_blocks: int,
        attn_resolutions: list[int], block: dict,
    ) -> int:  # fmt: skip
        """The encoder (``c_out``: the input's channels, the constant-ones one included); its output channels."""
        self.enc = nn.ModuleDict()
        for level, width in enumerate(widths):
            res = image_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(c_out, width, 3)
                c_out = width
            else:
                self.enc[f"{res}x{res}_down"] = MPBlock(c_out, c_out, c_emb, decoder=False, resample="down", **block)
            for i in range(num_blocks):
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = MPBlock(c_out, width, c_emb, decoder=False, attention=attention,
                                                            **block)  # fmt: skip
                c_out = width
        return c_out

    def _build_decoder(
        self, c_out: int, widths: list[int], c_emb: int, image_size: int, num_blocks: int,
        attn_resolutions: list[int], mid_attention: bool, block: dict,
    ) -> int:  # fmt: skip
        """The decoder, taking the encoder's skips in reverse order; its output channels."""
        self.dec = nn.ModuleDict()
        skips = [m.c_out for m in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = image_size >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = MPBlock(c_out, c_out, c_emb, decoder=True, attention=mid_attention,
                                                       **block)  # fmt: skip
                self.dec[f"{res}x{res}_in1"] = MPBlock(c_out, c_out, c_emb, decoder=True, **block)
            else:
                self.dec[f"{res}x{res}_up"] = MPBlock(c_out, c_out, c_emb, decoder=True, resample="up", **block)
            for i in range(num_blocks + 1):
                attention = res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = MPBlock(c_out + skips.pop(), width, c_emb, decoder=True,
                                                            attention=attention, **block)  # fmt: skip
                self.dec[f"{res}x{res}_block{i}"].takes_skip = True
                c_out = width
        return c_out

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """Forced weight normalisation of every layer (after each optimizer step; ``DiffusionModule`` calls it)."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.normalize_weight_()

    def embedding(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """mp_silu of the noise embedding, joined with the class embedding for labels below ``num_classes``."""
        emb = self.emb_noise(math.sqrt(2) * timestep_embedding(t, self.ch).to(self.emb_noise.weight.dtype))
        check_labels("MPUNet", self.num_classes, y, t.shape[0])
        if self.num_classes is not None:
            one_hot = F.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).to(emb.dtype)
            joined = mp_sum(emb, self.emb_label(one_hot * math.sqrt(self.num_classes)), self.label_balance)
            emb = torch.where((y < self.num_classes)[:, None], joined, emb)  # the null class: no class embedding
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The objective's output for x_t (B, C, H, W), integer t (B,) and, for a conditional network, labels y."""
        if x.shape[1] != self.in_channels or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the MPUNet's "
                f"(B, {self.in_channels}, {self.image_size}, {self.image_size})"
            )
        emb = self.embedding(t, y)
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            h = layer(h) if isinstance(layer, MPConv) else layer(h, emb)
            skips.append(h)
        for layer in self.dec.values():
            if layer.takes_skip:
                h = mp_cat(h, skips.pop(), self.concat_balance)
            h = layer(h, emb)
        return self.out_conv(h, gain=self.out_gain)


def _check(
    in_channels: int,
    image_size: int,
    ch: int,
    ch_mult: list[int],
    num_blocks: int,
    attn_resolutions: list[int],
    dropout: float,
    num_classes: int | None,
) -> None:
    for name, value in (("in_channels", in_channels), ("ch", ch), ("num_blocks", num_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"MPUNet {name} must be a positive integer, got {value!r}")
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise ValueError(f"MPUNet ch_mult must be a non-empty list of positive integers, got {ch_mult}")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(
            f"MPUNet image_size={image_size} cannot be halved {len(ch_mult) - 1} times by ch_mult={ch_mult}: it must "
            f"be a positive multiple of {factor}"
        )
    resolutions = [image_size >> i for i in range(len(ch_mult))]
    unknown = [r for r in attn_resolutions if r not in resolutions]
    if unknown:
        raise ValueError(f"MPUNet attn_resolutions {unknown} are not feature-map sizes; allowed: {resolutions}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"MPUNet dropout must be in [0, 1), got {dropout}")
    bad_classes = isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    if num_classes is not None and bad_classes:
        raise ValueError(f"MPUNet num_classes must be a positive integer or None (unconditional), got {num_classes!r}")
