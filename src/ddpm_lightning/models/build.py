"""Building a module's network and resolving its shape and classes: the network from its
``{"class_path", "init_args"}`` spec, the default U-Net or a preset with the flat shape composed over it, the image
shape and class count from the arguments or the network's attributes, one dummy forward that checks its output, and
the data checked against the shape.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ddpm_lightning.models.mp_unet import MPUNet
from ddpm_lightning.models.unet import UNet

__all__ = [
    "accepts_labels",
    "build_net",
    "check_data_shape",
    "check_output_shape",
    "make_net",
    "net_spec",
    "resolve_image_shape",
    "resolve_num_classes",
]


def accepts_labels(net: nn.Module) -> bool:
    """Whether ``net.forward`` takes the labels keyword ``y`` (or any keyword)."""
    parameters = inspect.signature(net.forward).parameters.values()
    return any(p.name == "y" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def net_spec(net: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a network, as YAML and checkpoints store it.

    The arguments are the network's ``init_args`` attribute (the template's networks keep theirs); for another class
    ``init_args`` is None and a checkpoint of it loads only when the network is passed again.
    """
    cls = type(net)
    init_args = getattr(net, "init_args", None)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args) if init_args else None}


def build_net(spec: Mapping[str, Any]) -> nn.Module:
    """The network of a ``{"class_path", "init_args"}`` mapping (:func:`net_spec`)."""
    class_path, init_args = spec.get("class_path"), spec.get("init_args")
    if not class_path or init_args is None:
        raise ValueError(
            f"the network {class_path or spec!r} was stored without its arguments (it was built in Python): pass "
            "the network again, e.g. load_module(ckpt, net=MyNet(...))"
        )
    module_name, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the network class {class_path!r}: {err}") from err
    return cls(**init_args)


def make_net(
    net: nn.Module | Mapping[str, Any] | None,
    image_size: int | None,
    in_channels: int | None,
    out_factor: int = 1,
    num_classes: int | None = None,
) -> nn.Module:
    """The network of a module: ``net`` as given (a mapping: built by :func:`build_net`), the default U-Net of
    the shape without one, or a U-Net preset with the flat shape, the learned variance's channels and the classes
    composed over it."""
    if isinstance(net, Mapping):  # a checkpoint's {"class_path", "init_args"} outside the CLI
        net = build_net(net)
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if net is None:
        shape = {"image_size": 32 if image_size is None else image_size}
        shape["in_channels"] = 3 if in_channels is None else in_channels
        out = {"out_channels": out_factor * shape["in_channels"]} if out_factor > 1 else {}
        return UNet(**shape, **out, **classes)
    if type(net) in (UNet, MPUNet):
        # the flat shape (model.image_size, model.in_channels) composed over a U-Net preset wins over it
        shape = {"image_size": image_size, "in_channels": in_channels}
        changes = {k: v for k, v in shape.items() if v is not None}
        if out_factor > 1 and net.init_args.get("out_channels") is None:
            # a learned variance: the preset's U-Net with twice the image channels out
            changes["out_channels"] = out_factor * changes.get("in_channels", net.init_args["in_channels"])
        if num_classes is not None and net.num_classes is None:
            changes["num_classes"] = num_classes  # an unconditional preset made conditional
        if any(net.init_args.get(k) != v for k, v in changes.items()):
            net = type(net)(**{**net.init_args, **changes})
    if not isinstance(net, nn.Module):
        raise ValueError(f"model.net must be a torch.nn.Module, got {type(net).__name__}")
    return net


def resolve_num_classes(net: nn.Module, num_classes: int | None) -> int | None:
    """The model's number of classes: the argument, else the network's ``num_classes`` attribute; a clear error
    when they disagree or when a conditional model's network does not take labels."""
    own = getattr(net, "num_classes", None)
    if num_classes is not None and own is not None and num_classes != own:
        raise ValueError(
            f"model.num_classes={num_classes} but the network {type(net).__name__} has num_classes={own}: set one "
            "of them"
        )
    value = num_classes if num_classes is not None else own
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.num_classes must be a positive integer or null (unconditional), got {value!r}")
    if not accepts_labels(net):
        raise ValueError(
            f"model.num_classes={value} makes the model class-conditional, but the network {type(net).__name__} "
            "does not take labels: its forward must accept net(x_t, t, y=labels) (the U-Net does with "
            "num_classes), or set model.num_classes=null"
        )
    return value


def resolve_image_shape(net: nn.Module, image_size: int | None, in_channels: int | None) -> tuple[int, int, int]:
    """(C, H, W) from the arguments, else from the network's attributes; a clear error when they disagree."""
    shape = {}
    for name, given in (("in_channels", in_channels), ("image_size", image_size)):
        own = getattr(net, name, None)
        if given is not None and own is not None and given != own:
            raise ValueError(
                f"model.{name}={given} but the network {type(net).__name__} has {name}={own}: set one of them"
            )
        value = given if given is not None else own
        if value is None:
            raise ValueError(f"set model.{name}: the network {type(net).__name__} does not say its {name}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        shape[name] = value
    return shape["in_channels"], shape["image_size"], shape["image_size"]


@torch.no_grad()
def check_output_shape(
    net: nn.Module, image_shape: tuple[int, int, int], factor: int, variance: str, num_classes: int | None
) -> None:
    """One forward of a dummy x_t (in eval mode: no dropout, no random numbers drawn) through the network: it
    must return x_t's shape, with ``factor`` times the channels (2 for a learned ``variance``)."""
    x_t = torch.zeros(1, *image_shape)
    expected = (1, factor * image_shape[0], *image_shape[1:])
    was_training = net.training
    net.eval()
    try:
        t = torch.zeros(1, dtype=torch.long)
        out = net(x_t, t) if num_classes is None else net(x_t, t, y=t)
    except Exception as err:
        raise ValueError(
            f"the network {type(net).__name__} fails on x_t of shape {tuple(x_t.shape)} and t of shape (1,): {err}"
        ) from err
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if factor > 1:
            raise ValueError(
                f"the network {type(net).__name__} returns {got} for x_t of shape {tuple(x_t.shape)}, but "
                f"model.variance={variance!r} needs {expected}: twice the image channels (the "
                "mean and the variance; set the network's out_channels), or a fixed variance"
            )
        raise ValueError(
            f"the network {type(net).__name__} returns {got} for x_t of shape {tuple(x_t.shape)}: it must "
            "return a tensor shaped like x_t (check its channels against model.in_channels)"
        )


def check_data_shape(image_shape: tuple[int, int, int], datamodule: Any) -> None:
    """A clear error when the data module's ``image_size``/``channels`` (where it says them; nothing to check without
    a data module) are not the model's (C, H, W) ``image_shape``."""
    size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
    C, H, W = image_shape
    if (size is not None and size != H) or (channels is not None and channels != C):
        raise ValueError(
            f"the data ({type(datamodule).__name__}) has {channels}x{size}x{size} images but the model expects "
            f"{C}x{H}x{W}: set model.image_size={size} and model.in_channels={channels} (or the network's), or "
            "change the data"
        )
