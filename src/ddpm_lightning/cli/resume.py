"""Resuming a fit: the settings given against the checkpoint's, and the time budget already spent.

Lightning's CLI replaces the model section with the checkpoint's hyper-parameters when ``--ckpt_path`` is a file (and
keeps the given one for ``--ckpt_path last``), so a ``--model.*`` given with a checkpoint would vanish without a word.
:func:`reconcile_model_settings` compares what was given with the checkpoint, the same way for both:

- settings that cannot change in a resumed run (:data:`SAFE_SETTINGS` excepted: the network and its arguments, the
  image shape, T, the schedule, the objective, the variance, anything new) stop the run with one message listing
  every difference;
- settings that can (:data:`SAFE_SETTINGS`) are applied and printed; the module puts them into the restored
  optimizer and learning-rate schedule (``DiffusionModule.on_train_start``). The schedule is a function of the step:
  a changed ``lr_schedule`` (its warm-up included) or ``trainer.max_steps`` (a decay's length) takes effect from the
  restored step on, as if the run had always had it;
- settings left at their defaults take the checkpoint's values.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from ddpm_lightning.checkpoint import read_checkpoint
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.diffusion.schedules import NoiseSchedule
from ddpm_lightning.diffusion.timesteps import TimestepSamplingConfig
from ddpm_lightning.diffusion.weighting import LossWeightingConfig
from ddpm_lightning.legacy import UNET_ALIASES
from ddpm_lightning.lit_module import DiffusionModule
from ddpm_lightning.models import UNet
from ddpm_lightning.optim import AdamConfig, LRSchedule, RuntimeConfig

__all__ = [
    "SAFE_SETTINGS",
    "BudgetSpent",
    "parse_max_time",
    "reconcile_model_settings",
    "spent_time_budget",
]

#: model settings a resumed run may change: the optimizer, the learning rate and its schedule (warm-up included), the
#: sampling defaults, the runtime (speed switches, the non-finite policy) and the label dropout
SAFE_SETTINGS = ("lr", "optimizer", "lr_schedule", "sampler", "runtime", "p_uncond")
#: the grouped settings, compared in their canonical form (a bare name equals its mapping with the defaults)
_GROUPED = {
    "schedule": NoiseSchedule,
    "loss_weighting": LossWeightingConfig,
    "lr_schedule": LRSchedule,
    "optimizer": AdamConfig,
    "runtime": RuntimeConfig,
}
#: network arguments that change memory and speed, not the function: a resumed run may change them
_NET_SPEED_SETTINGS = ("grad_checkpointing",)
_SHAPE = ("image_size", "in_channels")


class BudgetSpent(SystemExit):
    """The checkpoint's run has used its whole ``max_time``: nothing to train (exit status 0)."""


def _plain(value: Any) -> Any:
    """Namespaces, dataclasses, tuples as dicts and lists, for comparing given settings with stored ones."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, (SamplerConfig, *_GROUPED.values())):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _class(path: Any) -> Any:
    """The class a ``class_path`` names (the path itself when it cannot be imported)."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return str(path)


def _sampler(value: Any) -> dict[str, Any]:
    return SamplerConfig.parse(_plain(value)).to_dict()


def _timesteps(value: Any) -> str | dict[str, Any]:
    return TimestepSamplingConfig.parse(_plain(value)).to_setting()


def _defaults() -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(DiffusionModule.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _net_differences(given: Mapping[str, Any], stored: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The differences of the network setting (``model.net``, the flat U-Net aliases, the image shape) between the
    given settings and the checkpoint's; and whether the given network is the default (None: the checkpoint's)."""
    differences = []
    spec = _plain(stored.get("net")) or {}
    stored_args = spec.get("init_args") or {}
    net = _plain(given.get("net"))
    given_args: dict[str, tuple[str, Any]] = {}  # init_arg -> (the name the user gave it under, value)
    if isinstance(net, Mapping) and net.get("class_path"):
        if spec.get("class_path") and _class(net["class_path"]) != _class(spec["class_path"]):
            differences.append(f"model.net.class_path: checkpoint {spec['class_path']}, given {net['class_path']}")
            return differences, False
        for key, value in (net.get("init_args") or {}).items():
            # a shape or class count left out: the checkpoint's (or the data's, or model.num_classes)
            if value is not None or key not in (*_SHAPE, "num_classes"):
                given_args[key] = (f"model.net.init_args.{key}", value)
    elif net is not None:
        return differences, False  # a network object (Python): compared by the state-dict shapes at load
    unet = _class(spec.get("class_path")) is UNet
    for key in UNET_ALIASES:
        if given.get(key) is not None:
            given_args[key] = (f"model.{key}", given[key])
    for key in _SHAPE:
        value = given.get(key)
        if value is not None and key in stored and not _same(value, stored[key]):
            differences.append(f"model.{key}: checkpoint {stored[key]}, given {value}")
        elif value is not None and unet:
            given_args.setdefault(key, (f"model.{key}", value))
    for key, (name, value) in given_args.items():
        if key in stored_args and key not in _NET_SPEED_SETTINGS and not _same(value, stored_args[key]):
            differences.append(f"{name}: checkpoint {_plain(stored_args[key])}, given {_plain(value)}")
    return differences, net is None


def reconcile_model_settings(given: Mapping[str, Any], stored: Mapping[str, Any], source: str) -> tuple[dict, list]:
    """Compare the model settings given for a resumed fit with the checkpoint's hyper-parameters ``stored``.

    Returns (the settings to take from the checkpoint, i.e. those left at their defaults; the lines ``model.lr:
    checkpoint 0.001, given 1e-05`` of the safe settings that change). Raises ValueError listing every setting that
    cannot change.
    """
    given = {k: v for k, v in _plain(given).items()}
    defaults = _plain(_defaults())
    refused, changed, from_checkpoint = [], [], {}
    net_refused, take_net = _net_differences(given, stored)
    refused += net_refused
    if take_net and stored.get("net") is not None:
        from_checkpoint["net"] = stored["net"]
    for key, value in stored.items():
        if key in ("net", *_SHAPE) or key.startswith("_"):
            continue
        if key == "sampler":
            mine, theirs, default = _sampler(given.get(key)), _sampler(value), _sampler(defaults.get(key))
        elif key == "timestep_sampling":  # a bare name (earlier checkpoints) equals its mapping with the defaults
            mine, theirs, default = (_timesteps(v) for v in (given.get(key), value, defaults.get(key)))
        elif key in _GROUPED:
            mine, theirs, default = (_GROUPED[key].parse(_plain(v)).to_dict() for v in (given.get(key), value, None))
        else:
            mine, theirs, default = given.get(key), value, defaults.get(key, given.get(key))
        if _same(mine, theirs):
            continue
        if _same(mine, default):
            from_checkpoint[key] = value
            continue
        line = f"model.{key}: checkpoint {_plain(theirs)}, given {_plain(mine)}"
        (changed if key in SAFE_SETTINGS else refused).append(line)
    for key in _SHAPE:
        if given.get(key) is None and key in stored:
            from_checkpoint[key] = stored[key]
    if refused:
        raise ValueError(
            f"cannot resume {source} with these model settings, which change the model it holds:\n  "
            + "\n  ".join(refused)
            + f"\nsettings a resumed run may change: {', '.join(SAFE_SETTINGS)}. Resume with the checkpoint's "
            "settings (its run folder's config.yaml), or start a new run in another trainer.default_root_dir"
        )
    return from_checkpoint, changed


# ------------------------------------------------------------------------------------------------ time budget
def parse_max_time(value: Any) -> timedelta | None:
    """``trainer.max_time`` as a timedelta: ``"DD:HH:MM:SS"``, a mapping such as ``{hours: 12}``, a timedelta or
    None; ValueError naming the value otherwise."""
    if value is None or isinstance(value, timedelta):
        return value
    hint = 'use "DD:HH:MM:SS" (e.g. "00:12:00:00") or a mapping such as {hours: 12}'
    if isinstance(value, str):
        parts = value.split(":")
        try:
            days, hours, minutes, seconds = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"trainer.max_time={value!r} is not a duration: {hint}") from None
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if isinstance(value, Mapping):
        try:
            return timedelta(**{k: float(v) for k, v in value.items()})
        except (TypeError, ValueError):
            raise ValueError(f"trainer.max_time={dict(value)!r} is not a duration: {hint}") from None
    raise ValueError(f"trainer.max_time={value!r} is not a duration: {hint}")


def spent_time_budget(ckpt_path: str | Path, max_time: timedelta | None) -> str | None:
    """The one line to print when the checkpoint's run has trained for ``max_time`` or longer (the budget is
    cumulative over resumes, so a requeued job ends), else None."""
    if max_time is None:
        return None
    timer = (read_checkpoint(ckpt_path, mmap=True).get("callbacks") or {}).get("Timer") or {}
    elapsed = (timer.get("time_elapsed") or {}).get("train")
    if elapsed is None or elapsed < max_time.total_seconds():
        return None
    return (
        f"{ckpt_path} has trained for {timedelta(seconds=round(elapsed))} of trainer.max_time={max_time}: the time "
        "budget is spent, nothing to do (a larger trainer.max_time trains for the difference)"
    )
