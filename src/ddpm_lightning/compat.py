"""Every touch of a private Lightning / torch / torchmetrics API, in one place, each behind a small named function.

Each function checks, at its first use, that the private attribute it relies on is still there and otherwise raises
:class:`CompatError` naming the library, its installed version and the versions this code was verified with
(:data:`VERIFIED`, pinned in ``pyproject.toml``): a rename in a new release fails loudly here instead of silently
turning a feature off. ``tests/test_compat.py`` checks each one against the installed libraries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchmetrics import Metric

__all__ = [
    "VERIFIED",
    "CompatError",
    "attached_trainer",
    "averaged_model",
    "checkpoint_saved_step",
    "clear_found_inf",
    "disable_sigterm_broadcast",
    "drop_cli_keys",
    "ema_last_update_step",
    "fan_in_and_fan_out",
    "foreach_copy_",
    "foreach_lerp_",
    "given_hyperparameters",
    "is_compiled",
    "load_metric_states",
    "restore_sigterm_broadcast",
    "save_last_checkpoint",
    "set_ema_device",
    "set_ema_last_update_step",
    "set_found_inf",
]

#: The versions each private API below was verified with; ``pyproject.toml`` pins the same ranges.
VERIFIED = {"lightning": ">=2.6,<2.7", "torch": ">=2.6,<2.15", "torchmetrics": ">=1.6,<1.10"}


class CompatError(RuntimeError):
    """A private API this package relies on is missing from the installed library version."""


def _version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _require(owner: Any, name: str, library: str) -> None:
    """Raise :class:`CompatError` unless ``owner`` (a class or an instance) has the attribute ``name``."""
    if not hasattr(owner, name):
        what = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise CompatError(
            f"{library} {_version(library)} has no {what}.{name}, which ddpm-lightning uses (verified with "
            f"{library}{VERIFIED[library]}); install a verified version or update ddpm_lightning/compat.py"
        )


# ------------------------------------------------------------------------------------------------ Lightning
#: The keys LightningCLI adds to the hyper-parameters it saves: how it instantiated a module (``_instantiator``) and a
#: data module's class path (``_class_path``).
CLI_KEYS = ("_instantiator", "_class_path")


def attached_trainer(module: Any) -> Any:
    """The trainer ``module`` (a LightningModule) is attached to, or None: ``module.trainer`` raises without one."""
    _require(module, "_trainer", "lightning")
    return module._trainer


def given_hyperparameters() -> dict[str, Any]:
    """The settings LightningCLI is instantiating a module with, as written in its config (a network as its
    ``class_path``/``init_args``); empty outside such an instantiation."""
    from lightning.pytorch.core.mixins import hparams_mixin

    _require(hparams_mixin, "_given_hyperparameters", "lightning")
    return dict(hparams_mixin._given_hyperparameters.get() or {})


def drop_cli_keys(hparams: Any) -> str:
    """Remove LightningCLI's own keys (:data:`CLI_KEYS`) from ``hparams`` in place; return the class path it recorded
    for a data module ("" when none)."""
    found = {key: hparams.pop(key) for key in CLI_KEYS if key in hparams}
    return str(found.get("_class_path") or "")


def disable_sigterm_broadcast(trainer: Any) -> None:
    """Switch off Lightning's broadcast of its SIGTERM flag before every training step under DDP.

    It is a collective and a host-device sync on every step (Lightning-AI/pytorch-lightning#21487). Only safe while
    another handler (:class:`~ddpm_lightning.callbacks.GracefulStop`) has replaced Lightning's SIGTERM handler, so
    that the flag it broadcasts stays 0; undo with :func:`restore_sigterm_broadcast`.
    """
    loop = trainer.fit_loop.epoch_loop
    _require(type(loop), "_broadcast_sigterm_tensor", "lightning")
    loop._broadcast_sigterm_tensor = _no_sigterm_broadcast


def restore_sigterm_broadcast(trainer: Any) -> None:
    """Undo :func:`disable_sigterm_broadcast` (a no-op when it was not called)."""
    vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while another handler owns SIGTERM."""


def checkpoint_saved_step(callback: ModelCheckpoint) -> int:
    """The global step at which ``callback`` last wrote a checkpoint (0 before its first)."""
    _require(callback, "_last_global_step_saved", "lightning")
    return callback._last_global_step_saved


def save_last_checkpoint(callback: ModelCheckpoint, trainer: Any) -> None:
    """Write ``callback``'s ``last.ckpt`` now, as it does itself (its file name, version counter and link rules)."""
    _require(ModelCheckpoint, "_save_last_checkpoint", "lightning")
    _require(ModelCheckpoint, "_monitor_candidates", "lightning")
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def averaged_model(callback: WeightAveraging) -> AveragedModel | None:
    """The :class:`AveragedModel` of a weight-averaging callback during fit, else None."""
    _require(callback, "_average_model", "lightning")
    return callback._average_model


def set_ema_device(callback: WeightAveraging, device: torch.device) -> None:
    """Keep the average on ``device`` unless the callback was given a device of its own."""
    _require(callback, "_device", "lightning")
    if callback._device is None:
        callback._device = device


def ema_last_update_step(callback: WeightAveraging) -> int:
    """The optimizer step at which the average was last updated (0: never)."""
    _require(callback, "_latest_update_step", "lightning")
    return callback._latest_update_step


def set_ema_last_update_step(callback: WeightAveraging, step: int) -> None:
    """Record an update of the average at ``step`` (saved in the callback's state_dict)."""
    _require(callback, "_latest_update_step", "lightning")
    callback._latest_update_step = step


# ------------------------------------------------------------------------------------------------ torch
def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been called (torch keeps the compiled forward in ``_compiled_call_impl``)."""
    _require(nn.Module, "_compiled_call_impl", "torch")
    return module._compiled_call_impl is not None


def set_found_inf(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> bool:
    """Hand a fused optimizer the ``found_inf`` flag its step reads (1.0: skip the update on the device, weights and
    moments untouched), as ``GradScaler`` does; returns False for an optimizer that does not read one (not fused)."""
    if not optimizer.defaults.get("fused"):
        return False
    _require(optimizer, "_step_supports_amp_scaling", "torch")
    optimizer.found_inf = flag
    return True


def clear_found_inf(optimizer: torch.optim.Optimizer) -> None:
    """Remove the flag of :func:`set_found_inf` after the step."""
    vars(optimizer).pop("found_inf", None)


def fan_in_and_fan_out(weight: torch.Tensor) -> tuple[int, int]:
    """The fan-in and fan-out ``nn.init`` computes for ``weight`` (``nn.init._calculate_fan_in_and_fan_out``)."""
    _require(nn.init, "_calculate_fan_in_and_fan_out", "torch")
    return nn.init._calculate_fan_in_and_fan_out(weight)


def _foreach(name: str) -> Callable[..., Any]:
    _require(torch, name, "torch")
    return getattr(torch, name)


def foreach_lerp_(targets: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weight: float) -> None:
    """``t += weight * (e - t)`` for every pair, in a few fused kernels (``torch._foreach_lerp_``)."""
    _foreach("_foreach_lerp_")(targets, ends, weight)


def foreach_copy_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``t.copy_(s)`` for every pair, in a few fused kernels (``torch._foreach_copy_``)."""
    _foreach("_foreach_copy_")(targets, sources)


# ------------------------------------------------------------------------------------------------ torchmetrics
def load_metric_states(metric: Metric, states: dict[str, Any]) -> None:
    """Add ``states`` (by state name, e.g. FID's ``real_features_sum``) to a metric's own through the public
    ``Metric.merge_state``; the metric's other states are left as they are.

    The state names are the metric's internals: a name the installed torchmetrics does not have raises CompatError.
    """
    current = metric.metric_state
    for name in states:
        if name not in current:
            raise CompatError(
                f"torchmetrics {_version('torchmetrics')} has no state {name!r} in {type(metric).__name__} (it has "
                f"{sorted(current)}), which ddpm-lightning uses (verified with torchmetrics{VERIFIED['torchmetrics']})"
            )
    # merge_state reduces every state: the others get their reduction's neutral element, so they stay as they are
    neutral = {name: _neutral(value) for name, value in current.items() if name not in states}
    metric.merge_state({**neutral, **states})


def _neutral(value: Any) -> Any:
    """What leaves a summed (tensor) or concatenated (list) state unchanged: FID's and KID's states are one or the
    other."""
    return [] if isinstance(value, list) else torch.zeros_like(value)
