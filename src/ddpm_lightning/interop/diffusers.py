"""The paper's U-Net and schedule to and from diffusers' ``UNet2DModel`` + ``DDPMScheduler`` (a ``DDPMPipeline``).

- :func:`from_diffusers`: a ``UNet2DModel`` of the DDPM layout (the ``google/ddpm-*`` models: 32x32 CIFAR-10 and the
  256x256 CelebA-HQ / LSUN ones) and its scheduler config -> a checkpoint that ``ddpm sample``, ``ddpm evaluate``,
  ``ddpm nll`` and ``ddpm fit --init_from`` read. The weights go to the checkpoint's ``state_dict``, where the EMA
  callback puts the averaged weights, so sampling uses them.
- :func:`to_diffusers`: a checkpoint -> a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``),
  with the checkpoint's sampling weights (the EMA when the run had one).

diffusers is imported only here and in :mod:`ddpm_lightning.models.diffusers_unet`; a hub id is fetched (by
diffusers' ``from_pretrained``) only when one is given.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lightning as L
import torch
from torch import nn

from ddpm_lightning.io import atomic_folder, atomic_write
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import DiffusersUNet, UNet
from ddpm_lightning.models.diffusers_unet import import_diffusers, plain_config
from ddpm_lightning.sampling import load_module

__all__ = [
    "LayoutError",
    "diffusers_state_dict",
    "from_diffusers",
    "hub_reachable",
    "scheduler_settings",
    "to_diffusers",
    "unet_from_config",
    "unet_state_dict",
]

# ours <-> diffusers' names of the settings; the values that differ
OBJECTIVES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCES = {"fixed_large": "fixed_large", "fixed_small": "fixed_small", "learned_range": "learned_range"}
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PADDINGS = {"same": 0, "symmetric": 1}
TIME_CONDITIONINGS = {"add": "default", "scale_shift": "scale_shift"}  # UNet2DModel's resnet_time_scale_shift
# UNet2DModel settings that must have these values for the DDPM layout (Ho et al.'s network)
_FIXED = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "center_input_sample": False,
    "act_fn": "silu",
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2D",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_dim": None,
}


class LayoutError(ValueError):
    """A diffusers model, scheduler or checkpoint setting that has no counterpart on the other side."""


# ------------------------------------------------------------------------------------------------ the U-Net
def unet_from_config(config: Mapping[str, Any]) -> UNet:
    """Our :class:`UNet` with the function of a ``UNet2DModel`` config of the DDPM layout; LayoutError naming the
    first setting that does not map."""
    config = dict(config)
    for key, value in _FIXED.items():
        if key in config and config[key] != value:
            raise LayoutError(
                f"the UNet2DModel setting {key}={config[key]!r} does not map (the DDPM U-Net has {value!r})"
            )
    channels = [int(c) for c in config["block_out_channels"]]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise LayoutError(f"block_out_channels {channels} are not multiples of the first, {ch}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    allowed = {"DownBlock2D": False, "AttnDownBlock2D": True}
    for i, kind in enumerate(down):
        if kind not in allowed:
            raise LayoutError(f"down_block_types[{i}]={kind!r} does not map; allowed: {', '.join(allowed)}")
    attention = [allowed[kind] for kind in down]
    mirror = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != mirror:
        raise LayoutError(f"up_block_types {up} do not mirror down_block_types {down}: expected {mirror}")
    size = config["sample_size"]
    if not isinstance(size, int):
        if len(size) != 2 or size[0] != size[1]:
            raise LayoutError(f"sample_size {size} is not square")
        size = size[0]
    groups = config.get("norm_num_groups", 32)
    if config.get("attn_norm_num_groups") not in (None, groups):
        raise LayoutError(
            f"attn_norm_num_groups={config['attn_norm_num_groups']} differs from norm_num_groups={groups}"
        )
    shift = config.get("resnet_time_scale_shift", "default")
    time_conditioning = {v: k for k, v in TIME_CONDITIONINGS.items()}.get(shift)
    if time_conditioning is None:
        raise LayoutError(
            f"the UNet2DModel setting resnet_time_scale_shift={shift!r} does not map; allowed: "
            f"{', '.join(TIME_CONDITIONINGS.values())}"
        )
    if shift != "default" and config.get("attn_norm_num_groups") is None:
        # diffusers then builds the middle block's attention without its GroupNorm; the DDPM U-Net has one
        raise LayoutError(
            f"resnet_time_scale_shift={shift!r} with attn_norm_num_groups=None has no GroupNorm before the middle "
            f"attention; the DDPM U-Net needs attn_norm_num_groups={groups}"
        )
    head_dim = config.get("attention_head_dim")
    # the middle block, at the last level's width, has attention too
    widths = {c for c, a in zip(channels, attention, strict=True) if a} | {channels[-1]}
    if head_dim is not None and widths != {head_dim}:
        raise LayoutError(f"attention_head_dim={head_dim} makes several heads; the DDPM U-Net's attention has one")
    padding = {v: k for k, v in PADDINGS.items()}.get(config.get("downsample_padding", 1))
    if padding is None:
        raise LayoutError(f"downsample_padding={config['downsample_padding']} does not map; allowed: 0, 1")
    out_channels = int(config.get("out_channels") or config["in_channels"])
    return UNet(
        in_channels=int(config["in_channels"]),
        ch=ch,
        ch_mult=[c // ch for c in channels],
        num_res_blocks=int(config["layers_per_block"]),
        attn_resolutions=[size // 2**level for level, a in enumerate(attention) if a],
        dropout=float(config.get("dropout", 0.0)),
        image_size=int(size),
        out_channels=None if out_channels == int(config["in_channels"]) else out_channels,
        num_groups=int(groups),
        downsample_padding=padding,
        norm_eps=float(config.get("norm_eps", 1e-5)),
        time_conditioning=time_conditioning,
    )


def _config_of(net: UNet) -> dict[str, Any]:
    """The ``UNet2DModel`` config of our U-Net; LayoutError for a setting it cannot express."""
    args = dict(net.init_args)
    known = {"in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "image_size",
             "out_channels", "num_groups", "downsample_padding", "norm_eps", "grad_checkpointing",
             "time_conditioning"}  # fmt: skip
    unknown = sorted(args.keys() - known)
    if unknown:
        raise LayoutError(f"the U-Net setting {unknown[0]}={args[unknown[0]]!r} has no UNet2DModel counterpart")
    size, mults = args["image_size"], list(args["ch_mult"])
    attention = [size // 2**level in args["attn_resolutions"] for level in range(len(mults))]
    return {
        "sample_size": size,
        "in_channels": args["in_channels"],
        "out_channels": net.out_channels,
        "block_out_channels": [args["ch"] * m for m in mults],
        "layers_per_block": args["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "attention_head_dim": None,
        "norm_num_groups": args["num_groups"],
        "norm_eps": args["norm_eps"],
        "downsample_padding": PADDINGS[args["downsample_padding"]],
        "dropout": args["dropout"],
        **_FIXED,
        "resnet_time_scale_shift": TIME_CONDITIONINGS[args.get("time_conditioning", "add")],
        # with scale_shift diffusers drops the middle attention's GroupNorm unless its groups are given
        **({"attn_norm_num_groups": args["num_groups"]} if args.get("time_conditioning", "add") != "add" else {}),
    }


def _module_pairs(net: UNet) -> Iterator[tuple[str, str, str]]:
    """(our module, the UNet2DModel's module, kind) for every module with weights; kind is "res", "attn" or
    "plain" (a Linear, Conv2d or GroupNorm with the same parameter names)."""
    yield "temb.0", "time_embedding.linear_1", "plain"
    yield "temb.2", "time_embedding.linear_2", "plain"
    yield "conv_in", "conv_in", "plain"
    levels, blocks = len(net.init_args["ch_mult"]), net.init_args["num_res_blocks"]
    i = 0
    for level in range(levels):
        for r in range(blocks):
            yield f"down.{i}.0", f"down_blocks.{level}.resnets.{r}", "res"
            if len(net.down[i]) > 1:
                yield f"down.{i}.1", f"down_blocks.{level}.attentions.{r}", "attn"
            i += 1
        if level != levels - 1:
            yield f"down.{i}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"
            i += 1
    yield "mid.0", "mid_block.resnets.0", "res"
    yield "mid.1", "mid_block.attentions.0", "attn"
    yield "mid.2", "mid_block.resnets.1", "res"
    i = 0
    for j, level in enumerate(reversed(range(levels))):
        for r in range(blocks + 1):
            yield f"up.{i}.0", f"up_blocks.{j}.resnets.{r}", "res"
            if len(net.up[i]) > 1:
                yield f"up.{i}.1", f"up_blocks.{j}.attentions.{r}", "attn"
            i += 1
        if level != 0:
            yield f"up.{i}.0.conv", f"up_blocks.{j}.upsamplers.0.conv", "plain"
            i += 1
    yield "norm_out", "conv_norm_out", "plain"
    yield "conv_out", "conv_out", "plain"


_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
              "skip": "conv_shortcut"}  # fmt: skip


def _tensor_pairs(net: UNet) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(our parameter, the UNet2DModel parameters it is made of, how): how is "same", "qkv" (ours is the three
    (C, C) projections stacked into a (3C, C, 1, 1) 1x1 convolution) or "1x1" (a (C, C) linear as a 1x1 conv)."""
    own = net.state_dict()
    for ours, theirs, kind in _module_pairs(net):
        for p in ("weight", "bias"):
            if kind == "plain":
                yield f"{ours}.{p}", (f"{theirs}.{p}",), "same"
            elif kind == "res":
                for a, b in _RES_NAMES.items():
                    if f"{ours}.{a}.{p}" in own:
                        yield f"{ours}.{a}.{p}", (f"{theirs}.{b}.{p}",), "same"
            else:
                yield f"{ours}.norm.{p}", (f"{theirs}.group_norm.{p}",), "same"
                yield f"{ours}.qkv.{p}", tuple(f"{theirs}.to_{x}.{p}" for x in "qkv"), "qkv"
                yield f"{ours}.proj_out.{p}", (f"{theirs}.to_out.0.{p}",), "1x1"


def unet_state_dict(net: UNet, theirs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict from a ``UNet2DModel``'s; LayoutError naming the first parameter that does not fit."""
    own, used, result = net.state_dict(), set(), {}
    for name, sources, how in _tensor_pairs(net):
        for source in sources:
            if source not in theirs:
                raise LayoutError(f"the UNet2DModel has no parameter {source} (for {name} of the DDPM U-Net)")
        tensors = [theirs[s] for s in sources]
        value = torch.cat(tensors) if how == "qkv" else tensors[0]
        if how != "same" and value.numel() == own[name].numel():
            value = value.reshape(own[name].shape)  # (C, C) linear weights as (C, C, 1, 1) convolutions
        if tuple(value.shape) != tuple(own[name].shape):
            raise LayoutError(
                f"the UNet2DModel parameter {sources[0]} has shape {tuple(tensors[0].shape)}, which does not fit "
                f"{name} of shape {tuple(own[name].shape)}"
            )
        result[name] = value.detach().clone()
        used.update(sources)
    extra = sorted(theirs.keys() - used)
    if extra:
        raise LayoutError(f"the UNet2DModel parameter {extra[0]} has no counterpart in the DDPM U-Net")
    return result


def diffusers_state_dict(net: UNet) -> dict[str, torch.Tensor]:
    """The ``UNet2DModel`` state dict of our U-Net (the inverse of :func:`unet_state_dict`, exactly)."""
    own, result = net.state_dict(), {}
    for name, targets, how in _tensor_pairs(net):
        value = own[name].detach().contiguous()
        if how != "same" and value.dim() > 1:
            value = value.flatten(1)  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        if how == "qkv":
            for target, part in zip(targets, value.chunk(3), strict=True):
                result[target] = part.clone()
        else:
            result[targets[0]] = value.clone()
    return result


# ------------------------------------------------------------------------------------------------ the schedule
def scheduler_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``DiffusionModule`` settings (schedule, T, betas, variance, objective) of a ``DDPMScheduler`` config;
    LayoutError for one that has no counterpart."""
    T = int(config.get("num_train_timesteps", 1000))
    schedule = {v: k for k, v in SCHEDULES.items()}.get(config.get("beta_schedule", "linear"))
    if schedule is None:
        raise LayoutError(
            f"beta_schedule={config['beta_schedule']!r} does not map; allowed: {', '.join(SCHEDULES.values())}"
        )
    if config.get("trained_betas") is not None:
        raise LayoutError("trained_betas (an explicit list of betas) does not map to a named schedule")
    if config.get("rescale_betas_zero_snr"):
        raise LayoutError("rescale_betas_zero_snr=True does not map: the schedules here keep the paper's betas")
    variance_type = config.get("variance_type", "fixed_small")
    variance = {"fixed_small_log": "fixed_small", **{v: k for k, v in VARIANCES.items()}}.get(variance_type)
    if variance is None:
        raise LayoutError(f"variance_type={variance_type!r} does not map; allowed: {', '.join(VARIANCES.values())}")
    prediction = config.get("prediction_type", "epsilon")
    objective = {v: k for k, v in OBJECTIVES.items()}.get(prediction)
    if objective is None:
        raise LayoutError(f"prediction_type={prediction!r} does not map; allowed: {', '.join(OBJECTIVES.values())}")
    # our linear schedule rescales its endpoints by 1000 / T (make_betas); diffusers' does not
    scale = T / 1000
    beta_start, beta_end = float(config.get("beta_start", 1e-4)) * scale, float(config.get("beta_end", 0.02)) * scale
    return {
        "schedule": {"name": schedule, "beta_start": beta_start, "beta_end": beta_end},
        "num_timesteps": T,
        "variance": variance,
        "objective": objective,
    }


def _scheduler_config(module: DiffusionModule) -> dict[str, Any]:
    hp, T = module.hparams, module.diffusion.num_timesteps
    if hp["variance"] not in VARIANCES:
        raise LayoutError(f"variance={hp['variance']!r} has no DDPMScheduler variance_type; allowed: "
                          f"{', '.join(VARIANCES)}")  # fmt: skip
    return {
        "num_train_timesteps": T,
        "beta_schedule": SCHEDULES[module.schedule.name],
        "beta_start": module.schedule.beta_start * 1000 / T,
        "beta_end": module.schedule.beta_end * 1000 / T,
        "variance_type": VARIANCES[hp["variance"]],
        "prediction_type": OBJECTIVES[hp["objective"]],
        # the samplers here clip every x_0 prediction to [-1, 1], as Ho et al.'s code
        "clip_sample": True,
        "clip_sample_range": 1.0,
    }


# ------------------------------------------------------------------------------------------------ conversions
# what huggingface_hub raises (in the chain of diffusers' OSError) when the hub cannot be reached and nothing is cached
_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout")


def _offline_by_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _offline(err: BaseException) -> bool:
    """Whether ``err`` (or an error in its chain) says the hub could not be reached, or HF_HUB_OFFLINE is set."""
    if _offline_by_env():
        return True
    seen: BaseException | None = err
    while seen is not None:
        if type(seen).__name__ in _OFFLINE_ERRORS or "Name or service not known" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a connection to the Hugging Face hub (``HF_ENDPOINT``, or the HTTPS proxy when one is set) opens within
    ``timeout`` seconds: asked once before a hub id is fetched, instead of huggingface_hub's retries (about a minute
    offline)."""
    proxy = next(
        (os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None
    )
    url = proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if not parsed.hostname:
        return True  # an address this check cannot read: let huggingface_hub try it
    try:
        socket.create_connection(
            (parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)), timeout
        ).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode (``HF_HUB_OFFLINE``) inside the block: its cache only, no requests."""
    import huggingface_hub.constants as hub_constants

    before = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before[1]
        if before[0] is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = before[0]


def _pretrained(cls: Any, source: str, subfolder: str, method: str = "from_pretrained", **options: Any) -> Any:
    """``cls.from_pretrained(source, subfolder=...)`` for a pipeline folder, else from the folder itself."""
    load = getattr(cls, method)
    try:
        with warnings.catch_warnings():  # diffusers' use of an argument huggingface_hub deprecates
            warnings.filterwarnings("ignore", message=r".*local_dir_use_symlinks", category=UserWarning)
            return load(source, subfolder=subfolder, **options)
    except OSError:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*local_dir_use_symlinks", category=UserWarning)
                return load(source, **options)
        except OSError as err:
            what = f"cannot read a diffusers {cls.__name__} from {source}"
            if not Path(source).is_dir() and _offline(err):  # huggingface_hub's own reason would say a file is missing
                raise FileNotFoundError(
                    f"{what}, a hub id, and this machine is offline (no network, or HF_HUB_OFFLINE set) with no copy "
                    "in the Hugging Face cache: download it where there is network (`huggingface-cli download ID`, "
                    "then copy the cache) or pass a local folder"
                ) from err
            where = "a local folder" if Path(source).is_dir() else "a hub id (fetched only when online)"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(f"{what}, {where}: {reason}") from err


def from_diffusers(
    source: str | Path,
    out: str | Path,
    *,
    sampler: str = "ddpm",
    variance: str | None = None,
) -> DiffusionModule:
    """Write a checkpoint of the ``UNet2DModel`` and ``DDPMScheduler`` at ``source`` (a ``save_pretrained`` folder
    or pipeline folder, or a hub id) to ``out``; returns the module written.

    The weights are the checkpoint's sampling weights (``state_dict``: where the EMA callback keeps the average);
    ``sampler`` is the module's setting for the commands (the EMA of a fine-tuning run is its own EMA callback);
    ``variance``
    (``"fixed_large"`` or ``"fixed_small"``) replaces the scheduler's fixed variance, a sampling choice.
    """
    source = str(source)
    # a hub id on a machine without network: the cache only, at once (huggingface_hub would retry for a minute)
    offline = not Path(source).is_dir() and not _offline_by_env() and not hub_reachable()
    diffusers = import_diffusers()
    with _hub_offline() if offline else nullcontext():
        # low_cpu_mem_usage=False: the plain load, without asking for the accelerate package
        model = _pretrained(diffusers.UNet2DModel, source, "unet", low_cpu_mem_usage=False)
        scheduler_config = _pretrained(diffusers.DDPMScheduler, source, "scheduler", "load_config")
    settings = scheduler_settings(scheduler_config)
    if variance is not None:
        fixed = ("fixed_large", "fixed_small")
        if variance not in fixed or settings["variance"] not in fixed:
            raise LayoutError(
                f"variance={variance!r} can only replace a fixed variance by another ({', '.join(fixed)}); the "
                f"scheduler's is {settings['variance']!r}"
            )
        settings["variance"] = variance
    net = unet_from_config(model.config)
    net.load_state_dict(unet_state_dict(net, model.state_dict()))
    module = DiffusionModule(net, **settings, sampler=sampler)
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": L.__version__,
        "converted_from": {
            "diffusers": source,
            "unet_config": plain_config(model.config),
            "scheduler_config": plain_config(scheduler_config),
        },  # fmt: skip
    }
    atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    return module


def to_diffusers(ckpt: str | Path, out: str | Path, *, net: nn.Module | None = None) -> Path:
    """Write the checkpoint's network (its sampling weights: the EMA when the run had one) and schedule as a
    ``DDPMPipeline`` folder ``out``; LayoutError for what diffusers cannot express. Returns ``out``.

    ``net``: the network, for a checkpoint whose network was built in Python (as :func:`load_module`).
    """
    diffusers = import_diffusers()
    module = load_module(ckpt, "cpu", net=net)
    if module.num_classes is not None:
        raise LayoutError(
            f"the model is class-conditional (num_classes={module.num_classes}): DDPMPipeline samples unconditionally "
            "and has no classifier-free guidance, so it is not written"
        )
    net = module.net
    if isinstance(net, DiffusersUNet):
        unet = net.unet
    elif type(net) is UNet:
        unet = diffusers.UNet2DModel(**_config_of(net))
        unet.load_state_dict(diffusers_state_dict(net))
    else:
        raise LayoutError(
            f"the network {type(net).__module__}.{type(net).__qualname__} has no UNet2DModel counterpart: only "
            "ddpm_lightning.models.UNet and DiffusersUNet can be written for diffusers"
        )
    scheduler = diffusers.DDPMScheduler(**_scheduler_config(module))
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    with atomic_folder(out) as tmp:
        pipeline.save_pretrained(tmp)
    return Path(out)
