"""Every name of earlier versions, in one place: the checkpoints, configs and arguments that use them are upgraded
here, where they are read; nothing else in the package knows an old name. Deprecated in 0.1, removed in 0.2.0
(CHANGELOG.md). Torch is imported only inside the functions that need it, so that a command's ``--help`` stays fast.

- :func:`upgrade_state_dict`: the weights of checkpoints written before the network was injected (``unet.*`` ->
  ``net.*``).
- :func:`upgrade_hyperparameters`: the model settings of earlier versions onto today's, for checkpoints
  (``DiffusionModule.load_from_checkpoint``, a resumed fit) and configs (``ddpm fit``) alike: the flat U-Net aliases
  (:data:`UNET_ALIASES`, ``model.ch`` ...) into the network's ``init_args``, the other flat settings
  (:data:`SETTING_ALIASES`: ``model.sample_steps``, ``model.beta_end``, ``model.warmup_steps``, ``model.compile``
  ...) into the grouped setting that holds them today (``model.sampler.steps``, ``model.schedule.beta_end``,
  ``model.lr_schedule.warmup_steps``, ``model.runtime.compile`` ...), ``ema_decay`` dropped (the EMA is a callback),
  and a stored U-Net without a setting recorded later gets the value it ran with (:func:`upgrade_net_spec`,
  :data:`UNET_LEGACY_SETTINGS`: symmetric down-sampling padding, GroupNorm eps 1e-5).
- :data:`FLAT_MODEL_SETTINGS`: the types of the flat aliases, which ``ddpm fit`` accepts as options of the command.
- :func:`ema_decay_alias`: ``model.ema_decay`` of a ``ddpm fit`` config (or of a resumed checkpoint,
  :func:`config_settings`) as the EMA callback's ``decay`` in ``trainer.callbacks``.
- :func:`upgrade_callback_configs`: the flat ``num_steps``, ``eta`` and ``spacing`` of the sampling callbacks in a
  config (:data:`SAMPLER_CALLBACKS`, ``trainer.callbacks`` of ``ddpm fit``) into their ``sampler``.
- :func:`upgrade_sweep_argv`: ``ddpm sampler-sweep --nfe`` as ``--steps``; :func:`upgrade_convert_argv`: ``ddpm
  convert --ema-decay`` (ignored since the EMA became a callback) dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ddpm_lightning import choices

__all__ = [
    "FLAT_MODEL_SETTINGS",
    "CALLBACK_SAMPLER_ALIASES",
    "MODEL_ALIASES",
    "SAMPLER_CALLBACKS",
    "SETTING_ALIASES",
    "UNET_ALIASES",
    "UNET_LEGACY_SETTINGS",
    "config_settings",
    "ema_decay_alias",
    "flat_setting_target",
    "upgrade_convert_argv",
    "upgrade_hyperparameters",
    "upgrade_net_spec",
    "upgrade_state_dict",
    "upgrade_callback_configs",
    "upgrade_sweep_argv",
]

# prefix of the network's weights in checkpoints of earlier versions -> today's
_LEGACY_PREFIXES = {"unet.": "net."}
# the class paths a stored U-Net may have
_UNET_PATHS = ("ddpm_lightning.models.UNet", "ddpm_lightning.models.unet.UNet")
#: the settings of U-Nets stored before they were recorded: symmetric down-sampling padding and torch's GroupNorm eps
UNET_LEGACY_SETTINGS = {"downsample_padding": "symmetric", "norm_eps": 1e-5}
#: deprecated flat model settings of the default U-Net (``model.ch`` ...), from before the network was injected
UNET_ALIASES = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
#: deprecated flat model settings -> (the grouped setting of the module that holds it today, its field there)
SETTING_ALIASES = {
    "sample_steps": ("sampler", "steps"),
    "eta": ("sampler", "eta"),
    "sample_spacing": ("sampler", "spacing"),
    "beta_start": ("schedule", "beta_start"),
    "beta_end": ("schedule", "beta_end"),
    "min_snr_gamma": ("loss_weighting", "gamma"),
    "warmup_steps": ("lr_schedule", "warmup_steps"),
    "adam_betas": ("optimizer", "betas"),
    "weight_decay": ("optimizer", "weight_decay"),
    "compile": ("runtime", "compile"),
    "channels_last": ("runtime", "channels_last"),
    "matmul_precision": ("runtime", "matmul_precision"),
    "nonfinite_loss": ("runtime", "nonfinite_loss"),
}
#: the deprecated flat settings that :func:`upgrade_hyperparameters` moves into the module's settings
MODEL_ALIASES = (*UNET_ALIASES, *SETTING_ALIASES)
_EMA_DECAY = "ema_decay"  # deprecated model setting: the EMA callback's decay (ema_decay_alias)
_EMA_CLASS_PATH = "ddpm_lightning.callbacks.EMA"
#: the types of the deprecated flat model settings (options of ``ddpm fit``, not of the module)
FLAT_MODEL_SETTINGS: dict[str, Any] = {
    "ch": int,
    "ch_mult": list[int],
    "num_res_blocks": int,
    "attn_resolutions": list[int],
    "dropout": float,
    "sample_steps": int,
    "eta": float,
    "sample_spacing": Literal[choices.SPACINGS],  # type: ignore[valid-type]
    "beta_start": float,
    "beta_end": float,
    "min_snr_gamma": float,
    "warmup_steps": int,
    "adam_betas": tuple[float, float],
    "weight_decay": float,
    "compile": bool,
    "channels_last": bool,
    "matmul_precision": Literal[choices.MATMUL_PRECISIONS],  # type: ignore[valid-type]
    "nonfinite_loss": Literal[choices.NONFINITE_LOSSES],  # type: ignore[valid-type]
    _EMA_DECAY: float,
}
#: the callbacks that took flat sampler arguments, by class name -> the steps of a bare sampler name (their default)
SAMPLER_CALLBACKS = {"SamplingCallback": 50, "FIDCallback": 50, "DemoReport": 25}
#: their deprecated flat sampler arguments -> the field of ``init_args.sampler`` each one sets
CALLBACK_SAMPLER_ALIASES = {"num_steps": "steps", "eta": "eta", "spacing": "spacing"}
assert tuple(FLAT_MODEL_SETTINGS) == (*MODEL_ALIASES, _EMA_DECAY), "FLAT_MODEL_SETTINGS: an alias is missing"


def flat_setting_target(name: str) -> str:
    """Where today's config sets the flat model setting ``name``: ``model.net.init_args.ch``, ``model.sampler.steps``,
    ``model.schedule.beta_end`` ..."""
    if name == _EMA_DECAY:
        return f"trainer.callbacks: {_EMA_CLASS_PATH} with its decay"
    if name in UNET_ALIASES:
        return f"model.net.init_args.{name}"
    return "model.{}.{}".format(*SETTING_ALIASES[name])


def upgrade_state_dict(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Rename, in place, the keys of an earlier version's state dict (below ``prefix``) to today's names."""
    for key in list(state_dict):
        for old, new in _LEGACY_PREFIXES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)


def upgrade_net_spec(spec: Any) -> Any:
    """A ``{"class_path", "init_args"}`` network spec whose U-Net ``init_args`` lack a setting added later, with that
    setting at the value the network was trained with (:data:`UNET_LEGACY_SETTINGS`);
    anything else unchanged."""
    if not isinstance(spec, Mapping) or spec.get("class_path") not in _UNET_PATHS:
        return spec
    init_args = spec.get("init_args")
    if not isinstance(init_args, Mapping) or UNET_LEGACY_SETTINGS.keys() <= init_args.keys():
        return spec
    return {**spec, "init_args": {**UNET_LEGACY_SETTINGS, **init_args}}


def upgrade_hyperparameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint's hyper-parameters (or of a config's model settings) in today's form, without the
    deprecated aliases: the U-Net aliases (:data:`UNET_ALIASES`) and the flat shape set in the network's
    ``init_args``, or without a network the U-Net of those versions with them
    (:data:`UNET_LEGACY_SETTINGS`); the other flat settings (:data:`SETTING_ALIASES`) set in their grouped setting
    (``sampler``, ``schedule``, ``loss_weighting``, ``lr_schedule``, ``optimizer``, ``runtime``); ``ema_decay``
    dropped (the EMA callback's decay: :func:`ema_decay_alias`); the network spec upgraded (:func:`upgrade_net_spec`).

    ValueError for a U-Net alias given with another network (a ``class_path`` mapping or an ``nn.Module``).
    """
    hparams = dict(hparams)
    hparams.pop(_EMA_DECAY, None)
    unet = {key: value for key in UNET_ALIASES if (value := hparams.pop(key, None)) is not None}
    grouped: dict[str, dict[str, Any]] = {}
    for key, (setting, field) in SETTING_ALIASES.items():
        if (value := hparams.pop(key, None)) is not None:
            grouped.setdefault(setting, {})[field] = value
    if unet:
        # the flat shape set the U-Net's too
        unet |= {key: hparams[key] for key in ("image_size", "in_channels") if hparams.get(key) is not None}
        net = hparams.get("net")
        if net is None:
            hparams["net"] = {"class_path": _UNET_PATHS[0], "init_args": {**UNET_LEGACY_SETTINGS, **unet}}
        elif isinstance(net, Mapping) and net.get("class_path") in _UNET_PATHS:
            hparams["net"] = {**net, "init_args": {**(net.get("init_args") or {}), **unet}}
        else:
            name = net.get("class_path") if isinstance(net, Mapping) else type(net).__name__
            raise ValueError(
                f"model.{next(iter(unet))} is a setting of the default U-Net, but model.net is {name}: set it under "
                "model.net.init_args"
            )
    for setting, fields in grouped.items():
        hparams[setting] = _set_fields(setting, hparams.get(setting), fields)
    if "net" in hparams:
        hparams["net"] = upgrade_net_spec(hparams["net"])
    return hparams


def _set_fields(setting: str, value: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """The grouped setting ``value`` (a name, a mapping or None) with ``fields`` set, as its plain mapping."""
    # torch: not for the commands' --help
    from ddpm_lightning.diffusion import SamplerConfig
    from ddpm_lightning.diffusion.schedules import NoiseSchedule
    from ddpm_lightning.diffusion.weighting import LossWeightingConfig
    from ddpm_lightning.optim import AdamConfig, LRSchedule, RuntimeConfig

    if setting == "sampler":
        return SamplerConfig.parse(value, **fields).to_dict()
    cls = {"schedule": NoiseSchedule, "loss_weighting": LossWeightingConfig, "lr_schedule": LRSchedule,
           "optimizer": AdamConfig, "runtime": RuntimeConfig}[setting]  # fmt: skip
    return cls.parse({**cls.parse(value).to_dict(), **fields}).to_dict()


def config_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The deprecated settings of a checkpoint's hyper-parameters that a resumed ``ddpm fit`` takes into its config
    rather than into the module: ``ema_decay`` (:func:`ema_decay_alias`)."""
    decay = hparams.get(_EMA_DECAY)
    return {} if decay is None else {_EMA_DECAY: decay}


def ema_decay_alias(config: Any, average_kind: Callable[[Any], str | None]) -> float | None:
    """Turn the deprecated ``model.ema_decay`` of a parsed ``ddpm fit`` config into the EMA callback, with a warning.

    ``average_kind(entry)`` says what a ``trainer.callbacks`` entry is: ``"ema"`` (``ddpm_lightning.callbacks.EMA``
    or a subclass), ``"other"`` (another weight average, ``PostHocEMA``) or None. A listed EMA gets that ``decay``
    (0: it is removed); without one, ``trainer.callbacks`` gets an entry ``ddpm_lightning.callbacks.EMA`` with that
    ``decay`` when ``default_callbacks`` names "EMA" (0: "EMA" is left out of them); another listed weight average
    wins and the value is ignored. Removes ``model.ema_decay`` and returns the value it had (None: not given).
    """
    from jsonargparse import Namespace
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    model = config.get("model")
    decay = model.get(_EMA_DECAY) if model is not None else None
    if model is not None and _EMA_DECAY in model:
        del model[_EMA_DECAY]
    if decay is None:
        return None
    callbacks = config.trainer.get("callbacks")
    callbacks = callbacks if isinstance(callbacks, list) else [] if callbacks is None else [callbacks]
    kinds = [average_kind(entry) for entry in callbacks]
    emas = [entry for entry, kind in zip(callbacks, kinds, strict=True) if kind == "ema"]
    others = [entry for entry, kind in zip(callbacks, kinds, strict=True) if kind == "other"]
    if others:
        rank_zero_warn(
            f"model.ema_decay={decay} is deprecated and ignored: trainer.callbacks lists {others[0].class_path}, "
            "the run's weight average",
            category=FutureWarning,
        )
        return decay
    advice = f"`- {{class_path: {_EMA_CLASS_PATH}, init_args: {{decay: {decay}}}}}`"
    rank_zero_warn(
        f"model.ema_decay={decay} is deprecated: list the EMA callback in trainer.callbacks instead, {advice}"
        + (" (0: no EMA; leave EMA out of default_callbacks)" if decay == 0 else ""),
        category=FutureWarning,
    )
    names = config.get("default_callbacks") or []
    if decay == 0:
        config.trainer.callbacks = [entry for entry in callbacks if all(entry is not ema for ema in emas)]
        config.default_callbacks = [name for name in names if name != "EMA"]
    elif emas:
        for entry in emas:
            entry.init_args.decay = decay
    elif "EMA" in names:  # as before: the decay of the default EMA, which default_callbacks may leave out
        entry = Namespace(class_path=_EMA_CLASS_PATH, init_args=Namespace(decay=decay, update_starting_at_step=None))
        config.trainer.callbacks = [*callbacks, entry]
    return decay


def upgrade_callback_configs(config: Any) -> tuple[Any, list[str]]:
    """A loaded config (or a value of one) whose callback entries of :data:`SAMPLER_CALLBACKS` set the deprecated
    ``init_args`` ``num_steps``, ``eta`` and ``spacing`` (:data:`CALLBACK_SAMPLER_ALIASES`) in ``init_args.sampler``
    (a bare sampler name there running the callback's former default steps), and one line for each such entry that
    says what to set instead; anything else is returned unchanged. ValueError naming the callback for a bad value."""
    messages: list[str] = []

    def upgrade(value: Any) -> Any:
        if isinstance(value, list):
            return [upgrade(item) for item in value]
        if not isinstance(value, Mapping):
            return value
        value = {key: upgrade(item) for key, item in value.items()}
        class_path, init_args = str(value.get("class_path")), value.get("init_args")
        name = class_path.rpartition(".")[2]
        if name not in SAMPLER_CALLBACKS or not isinstance(init_args, Mapping):
            return value
        old = {key: init_args[key] for key in CALLBACK_SAMPLER_ALIASES if key in init_args}
        if not old:
            return value
        from ddpm_lightning.diffusion import SamplerConfig  # torch: not for the commands' --help

        base = SamplerConfig("ddim", SAMPLER_CALLBACKS[name])
        fields = {CALLBACK_SAMPLER_ALIASES[key]: item for key, item in old.items()}
        try:
            sampler = SamplerConfig.parse(init_args.get("sampler"), base, **fields).to_dict()
        except ValueError as err:
            raise ValueError(f"{class_path}: {err}") from err
        given = ", ".join(f"init_args.{key}={item!r}" for key, item in old.items())
        new = ", ".join(f"init_args.sampler.{field}" for field in fields)
        messages.append(f"{class_path}: {given}: deprecated, set {new} instead")
        rest = {key: item for key, item in init_args.items() if key not in old}
        return {**value, "init_args": {**rest, "sampler": sampler}}

    return upgrade(config), messages


def upgrade_convert_argv(argv: Sequence[str]) -> list[str]:
    """``ddpm convert`` arguments without the deprecated ``--ema-decay VALUE``, ignored since the EMA of a fine-tuning
    run became the EMA callback of its config, with a warning."""
    argv, kept = list(argv), []
    i = 0
    while i < len(argv):
        if argv[i] == "--ema-decay" or argv[i].startswith("--ema-decay="):
            warnings.warn(
                "ddpm convert: --ema-decay is deprecated and ignored: the EMA of a fine-tuning run is the EMA "
                f"callback of its config (trainer.callbacks: {_EMA_CLASS_PATH} with its decay)",
                FutureWarning,
                stacklevel=3,
            )
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    return kept


def upgrade_sweep_argv(argv: Sequence[str]) -> list[str]:
    """``ddpm sampler-sweep`` arguments with the deprecated ``--nfe`` written as ``--steps``, with a warning."""
    argv = list(argv)
    if not any(a == "--nfe" or a.startswith("--nfe=") for a in argv):
        return argv
    warnings.warn("ddpm sampler-sweep: --nfe is deprecated, use --steps", FutureWarning, stacklevel=3)
    return ["--steps" if a == "--nfe" else a.replace("--nfe=", "--steps=", 1) if a.startswith("--nfe=") else a
            for a in argv]  # fmt: skip
