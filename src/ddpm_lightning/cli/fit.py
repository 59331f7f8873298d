"""``ddpm fit`` (and validate/test/predict): LightningCLI over :class:`DiffusionModule`, with the config edits a run
needs and the default callbacks, visible in the config.

- Loggers write into the run folder ``trainer.default_root_dir`` (:func:`follow_run_dir`) and ModelCheckpoints
  without a ``dirpath`` into ``<run dir>/checkpoints`` (:func:`checkpoints_in_run_dir`), so that
  ``--ckpt_path last`` (:func:`resolve_ckpt_path`) finds the previous run's ``last.ckpt``; a resumed fit continues
  its W&B run (:func:`resume_wandb_run`) and its TensorBoard/CSV ``version_N`` folder (:func:`resume_logger_versions`).
- Every logger gets the resolved config, the git commit and the package versions (:class:`LogRunConfig`).
- The option ``default_callbacks`` names the callbacks of :func:`ddpm_lightning.callbacks.default_callbacks` the run
  gets (all by default; ``--print_config`` shows them). They are added to whatever ``trainer.callbacks`` a config
  lists, unless a callback of the same kind is already there, so a config with its own callbacks never loses the
  EMA, the graceful stop or the final checkpoint; drop one by leaving its name out. A listed weight average
  (``ddpm_lightning.callbacks.EMA`` with its ``decay``, or ``PostHocEMA``) stands in for the default ``EMA(0.9999)``.
- The deprecated flat model settings of earlier versions (:data:`~ddpm_lightning.legacy.FLAT_MODEL_SETTINGS`) are
  options of the command (not of the module) that set today's settings, with a warning, before a resumed run compares
  its settings with the checkpoint's: the U-Net's ``model.ch`` ... its ``model.net.init_args``, the others their
  grouped setting (:func:`model_aliases`), and the EMA's decay the EMA callback in ``trainer.callbacks``, so the run's
  ``config.yaml`` shows it (:func:`~ddpm_lightning.legacy.ema_decay_alias`).; the deprecated
  ``num_steps``, ``eta`` and ``spacing`` of a sampling callback in a config file or a ``--trainer.callbacks`` value set
  its ``sampler`` as the config is read, with a warning (:func:`load_config_value`).
- The model's image shape, where neither the config nor the network gives it, is the data module's
  (:func:`shape_from_data`), so that a config writes it once, in ``data``.
- One fit at a time per run folder: the first process of a fit (global rank 0) holds ``<run dir>/fit.lock``
  (:func:`lock_run_dir`) for its whole life; a second ``ddpm fit`` into the same folder stops with one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Sequence
from copy import deepcopy
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from ddpm_lightning import io
from ddpm_lightning.averaging import WeightAverage
from ddpm_lightning.callbacks import DEFAULT_CALLBACKS, EMA, default_callbacks
from ddpm_lightning.callbacks.tracking import read_logger_versions, read_wandb_run_id
from ddpm_lightning.checkpoint import (
    check_state_dict_shapes,
    read_checkpoint,
    read_net_weights,
    use_atomic_checkpoints,
)
from ddpm_lightning.cli.config_errors import ConfigErrorParser
from ddpm_lightning.cli.resume import BudgetSpent, parse_max_time, reconcile_model_settings, spent_time_budget
from ddpm_lightning.data.base import ImageDataModule, per_process_batch_size
from ddpm_lightning.legacy import (
    FLAT_MODEL_SETTINGS,
    MODEL_ALIASES,
    SETTING_ALIASES,
    config_settings,
    ema_decay_alias,
    flat_setting_target,
    upgrade_callback_configs,
    upgrade_hyperparameters,
)
from ddpm_lightning.lit_module import DiffusionModule

__all__ = [
    "DDPMCLI",
    "DefaultCallback",
    "LogRunConfig",
    "checkpoints_in_run_dir",
    "cpu_world_size",
    "data_shape",
    "finish_wandb_run",
    "fit",
    "follow_run_dir",
    "git_commit",
    "init_from",
    "is_first_process",
    "load_config_value",
    "lock_run_dir",
    "model_aliases",
    "package_versions",
    "resolve_ckpt_path",
    "RunConfigParser",
    "resume_logger_versions",
    "resume_wandb_run",
    "run_cli",
    "run_metadata",
    "shape_from_data",
    "with_default_callbacks",
]

#: The names the ``default_callbacks`` option takes (the classes of :data:`DEFAULT_CALLBACKS`).
DefaultCallback = Literal[
    "EMA", "RNGStates", "GracefulStop", "FinalCheckpoint", "ProgressBar", "ImagesPerSecond", "WandbRunId"
]
assert get_args(DefaultCallback) == tuple(cls.__name__ for cls in DEFAULT_CALLBACKS), (
    "DefaultCallback: a name is missing"
)
# a callback of one of these kinds in trainer.callbacks stands in for the default of that name (two EMAs would
# average twice, and Lightning refuses two progress bars)
_SAME_KIND: dict[str, tuple[type, ...]] = {
    "EMA": (WeightAveraging, WeightAverage),
    "ProgressBar": (LightningProgressBar,),
}

# a logger's save_dir with one of these values follows trainer.default_root_dir (WandbLogger's own default is ".")
RUN_DIR_PLACEHOLDERS = (None, "", ".", "${trainer.default_root_dir}")
TRACKED_PACKAGES = ("ddpm-lightning", "torch", "torchvision", "lightning", "torchmetrics", "torch-fidelity", "wandb")
_LOGGER_CLASSES_WITH_SAVE_DIR = ("WandbLogger", "TensorBoardLogger", "CSVLogger")
# the variables a launcher sets to a process's rank: torchrun (RANK, GROUP_RANK, LOCAL_RANK), SLURM's srun
# (SLURM_PROCID), Lightning's own launcher and a multi-node launch by hand (NODE_RANK, LOCAL_RANK)
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")
RUN_LOCK = "fit.lock"


# ------------------------------------------------------------------------------------------------ config reading
#: the parser mode of the command (jsonargparse's ``parser_mode``): YAML read by :func:`load_config_value`
CONFIG_MODE = "ddpm_yaml"
_load_yaml = get_loader("yaml")


def load_config_value(text: str) -> Any:
    """A config file or value (``--trainer.callbacks+={...}``) read as YAML, with the deprecated flat sampler
    arguments of its callbacks set in their ``sampler`` (:func:`~ddpm_lightning.legacy.upgrade_callback_configs`,
    with a warning)."""
    value, messages = upgrade_callback_configs(_load_yaml(text))
    for message in messages:
        rank_zero_warn(message, category=FutureWarning)
    return value


set_loader(CONFIG_MODE, load_config_value, exceptions=(yaml.YAMLError,))


# ------------------------------------------------------------------------------------------------ metadata
def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), with ``-dirty`` if it has edits."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed wheel) or no git
    return f"{commit}-dirty" if status.strip() else commit


def package_versions() -> dict[str, str]:
    """Versions of Python, CUDA and the packages a run's numbers depend on."""
    versions = {"python": platform.python_version(), "cuda": str(torch.version.cuda)}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_metadata(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every logger records about a run: the resolved config, the git commit and the package versions."""
    return {"config": config or {}, "git_commit": git_commit(), "versions": package_versions()}


class LogRunConfig(SaveConfigCallback):
    """LightningCLI's config saver (``config.yaml`` in the log dir) that also sends :func:`run_metadata` to loggers."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(run_metadata(config))


# ------------------------------------------------------------------------------------------------ config edits
def _entries(value: Any) -> list[Any]:
    """A config value that is one entry, a list of them or None, as a list."""
    return value if isinstance(value, list) else [] if value is None else [value]


def _run_dir(trainer_config: Any) -> Path:
    return Path(getattr(trainer_config, "default_root_dir", None) or os.getcwd())  # Lightning's own default


def _logger_configs(trainer_config: Any) -> list[Any]:
    """The ``class_path``/``init_args`` entries of ``trainer.logger`` in a parsed (jsonargparse) config."""
    loggers = _entries(getattr(trainer_config, "logger", None))
    return [entry for entry in loggers if getattr(entry, "class_path", None) and hasattr(entry, "init_args")]


def _checkpoint_configs(trainer_config: Any) -> list[Any]:
    """The ModelCheckpoint entries (with ``init_args``) of ``trainer.callbacks`` in a parsed config."""
    callbacks = _entries(getattr(trainer_config, "callbacks", None))
    return [
        entry
        for entry in callbacks
        if getattr(entry, "class_path", "").endswith("ModelCheckpoint") and getattr(entry, "init_args", None)
    ]


def follow_run_dir(trainer_config: Any) -> None:
    """Point every W&B/TensorBoard/CSV logger whose ``save_dir`` is unset or a placeholder at the run folder.

    The placeholders are the values in :data:`RUN_DIR_PLACEHOLDERS`; an explicit other path is kept.
    """
    for entry in _logger_configs(trainer_config):
        if entry.class_path.rsplit(".", 1)[-1] not in _LOGGER_CLASSES_WITH_SAVE_DIR:
            continue
        if getattr(entry.init_args, "save_dir", None) in RUN_DIR_PLACEHOLDERS:
            entry.init_args.save_dir = str(_run_dir(trainer_config))


def checkpoints_in_run_dir(trainer_config: Any) -> None:
    """Give every configured ModelCheckpoint without a ``dirpath`` the fixed folder ``<run dir>/checkpoints``.

    By default Lightning puts checkpoints under the logger's ``version_N`` folder, a new one per run, where
    ``--ckpt_path last`` of the next run would not look.
    """
    for entry in _checkpoint_configs(trainer_config):
        if getattr(entry.init_args, "dirpath", None) is None:
            entry.init_args.dirpath = str(_run_dir(trainer_config) / "checkpoints")


def _class_of(class_path: Any) -> type | None:
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # Lightning names the bad class_path when it instantiates it
    return cls if isinstance(cls, type) else None


def average_kind(entry: Any) -> str | None:
    """What a ``trainer.callbacks`` entry of a parsed config is: ``"ema"`` (:class:`EMA` or a subclass), ``"other"``
    (another weight average, ``PostHocEMA``) or None."""
    cls = _class_of(getattr(entry, "class_path", None))
    if cls is None or not issubclass(cls, (WeightAveraging, WeightAverage)):
        return None
    return "ema" if issubclass(cls, EMA) else "other"


def model_aliases(model: Any) -> dict[str, Any]:
    """The settings of a parsed config's ``model`` that its deprecated flat aliases set
    (:func:`~ddpm_lightning.legacy.upgrade_hyperparameters`: ``model.ch`` into ``model.net.init_args.ch``, or a
    U-Net of those versions without a network; ``model.sample_steps`` into ``model.sampler.steps``,
    ``model.beta_end`` into ``model.schedule.beta_end`` ...), with a warning; empty when none is set. The CLI then
    removes the aliases from the config: the module does not take them.
    """
    given = {key: value for key in MODEL_ALIASES if (value := model.get(key)) is not None}
    if not given:
        return {}
    plain = {key: _plain(model.get(key)) for key in _ALIAS_TARGETS}
    upgraded = upgrade_hyperparameters({**plain, **given})
    names = [flat_setting_target(k) for k in given]
    rank_zero_warn(
        f"{', '.join(f'model.{k}={v!r}' for k, v in given.items())}: deprecated, set {', '.join(names)} instead",
        category=FutureWarning,
    )
    return {key: upgraded[key] for key in _ALIAS_TARGETS if upgraded.get(key) != plain[key]}


# the model settings the flat aliases set
_ALIAS_TARGETS = ("net", *dict.fromkeys(setting for setting, _ in SETTING_ALIASES.values()))


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def data_shape(data: Any) -> tuple[int | None, int | None]:
    """(image_size, channels) of a parsed config's ``data`` entry, read before the data module is built: its
    ``init_args``, else its class's attributes (``CIFAR10DataModule`` holds its shape so); None where neither says."""
    cls = _class_of(getattr(data, "class_path", None))
    init_args = getattr(data, "init_args", None)
    shape = []
    for name in ("image_size", "channels"):
        value = init_args.get(name) if isinstance(init_args, Namespace) else None
        value = getattr(cls, name, None) if value is None else value
        shape.append(value if isinstance(value, int) and not isinstance(value, bool) else None)
    return shape[0], shape[1]


def shape_from_data(config: Any) -> dict[str, int]:
    """Give the model of a parsed config the data's image shape (:func:`data_shape`) where neither the config nor the
    network gives it; returns what was filled in.

    For ``image_size`` and ``in_channels`` each: a value set in ``model`` (``model.image_size``) stays, and so does
    one the network's ``init_args`` set (``DiffusionModule.setup`` checks either against the data: an error naming
    both); otherwise ``model`` takes the data's, and so does a network argument of that name left at None (a preset
    without a shape: the U-Net is built for the data). Done here, before the classes are built, and not with a
    LightningCLI link: a link's target cannot be set by the user, and a data module may hold its shape as class
    attributes rather than arguments. ``--print_config`` shows the config after this step (:class:`RunConfigParser`).
    """
    model, data = config.get("model"), config.get("data")
    if model is None or data is None:
        return {}
    net = model.get("net")
    net_args = getattr(net, "init_args", None) if isinstance(net, Namespace) else None
    filled = {}
    for key, from_data in zip(("image_size", "in_channels"), data_shape(data), strict=True):
        given, in_net = model.get(key), net_args.get(key) if net_args is not None else None
        if given is None and in_net is not None:
            continue  # the network says it
        value = given if given is not None else from_data
        if value is None:
            continue  # the module asks for it
        if net_args is not None and key in net_args and in_net is None:
            net_args[key] = value
        if given is None:
            model[key] = filled[key] = value
    return filled


class RunConfigParser(ConfigErrorParser):
    """The command's parser (one-line errors, :class:`ConfigErrorParser`), whose dump (``--print_config``, the run's
    ``config.yaml``) shows the image shape the model takes from the data (:func:`shape_from_data`), not null, and
    leaves out the deprecated flat model settings that are not set."""

    def dump(self, cfg: Any = None, *args: Any, **kwargs: Any) -> str:
        if isinstance(cfg, Namespace) and cfg.get("model") is not None:
            cfg = deepcopy(cfg)
            for key in FLAT_MODEL_SETTINGS:
                if key in cfg.model and cfg.model[key] is None:
                    del cfg.model[key]
            if cfg.get("data") is not None:
                shape_from_data(cfg)
        return super().dump(cfg, *args, **kwargs)


def resolve_ckpt_path(trainer_config: Any, ckpt_path: str | Path | None) -> str | Path | None:
    """``"last"`` -> the newest ``last*.ckpt`` of the configured checkpoint folders; None, with a printed note, when
    there is none: the run starts fresh, so the same command starts and continues a run."""
    if ckpt_path != "last":
        return ckpt_path
    folders = {_run_dir(trainer_config) / "checkpoints"}
    for entry in _checkpoint_configs(trainer_config):
        dirpath = getattr(entry.init_args, "dirpath", None)
        if dirpath is not None:
            folders.add(Path(dirpath))
    candidates = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")]
    if not candidates:
        _print(f"--ckpt_path last: no last.ckpt in {', '.join(sorted(map(str, folders)))} yet; starting a new run")
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def resume_wandb_run(trainer_config: Any, ckpt_path: str | Path | None) -> str | None:
    """Give a WandbLogger without an id the run id kept in ``ckpt_path``; returns the id it set, if any."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return None  # also "last"/"hpc": Lightning resolves those itself
    for entry in _logger_configs(trainer_config):
        if entry.class_path.rsplit(".", 1)[-1] != "WandbLogger":
            continue
        if getattr(entry.init_args, "id", None) or getattr(entry.init_args, "version", None):
            return None  # the user chose a run
        run_id = read_wandb_run_id(ckpt_path)
        if run_id is not None:
            entry.init_args.id = run_id  # WandbLogger passes resume="allow" to wandb.init
        return run_id
    return None


def resume_logger_versions(trainer_config: Any, ckpt_path: str | Path | None) -> list[str]:
    """Give the TensorBoard and CSV loggers of a fit resumed from ``ckpt_path`` the versions stored in it
    (:func:`~ddpm_lightning.callbacks.tracking.read_logger_versions`), so that the run keeps writing into its
    ``version_N`` folder instead of opening a new one per resume. A logger given a ``version`` keeps it; Lightning's
    default logger (``trainer.logger`` unset) becomes the same logger with the stored version. Returns the versions
    set."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return []
    stored = read_logger_versions(ckpt_path)
    if not stored:
        return []
    if getattr(trainer_config, "logger", None) in (None, True):  # Lightning's default logger, of the stored class
        first = stored[0]
        if first["class"] not in _LOGGER_CLASSES_WITH_SAVE_DIR:
            return []
        init_args = Namespace(save_dir=str(_run_dir(trainer_config)), name=first["name"], version=first["version"])
        trainer_config.logger = Namespace(class_path=f"lightning.pytorch.loggers.{first['class']}", init_args=init_args)
        return [f"{first['name']}/version_{first['version']}"]
    resumed = []
    for entry in _logger_configs(trainer_config):
        kind = entry.class_path.rsplit(".", 1)[-1]
        if getattr(entry.init_args, "version", None) is not None:
            continue  # the user chose a version
        for version in stored:
            if version["class"] == kind and version["name"] == getattr(entry.init_args, "name", None):
                entry.init_args.version = version["version"]
                resumed.append(f"{version['name']}/version_{version['version']}")
                break
    return resumed


def is_first_process() -> bool:
    """Whether this process is global rank 0 of its run, from the environment, before any Trainer exists: every
    rank variable a launcher sets (:data:`_RANK_VARIABLES`) that is set is 0. The processes Lightning starts for the
    other local ranks get ``LOCAL_RANK``, the other nodes ``NODE_RANK``/``GROUP_RANK`` or ``SLURM_PROCID``."""
    return all(int(os.environ.get(name) or 0) == 0 for name in _RANK_VARIABLES)


def lock_run_dir(trainer_config: Any) -> Any:
    """In the first process of a fit (:func:`is_first_process`), take ``<run dir>/fit.lock`` for the life of the
    process (:func:`ddpm_lightning.io.lock_folder`: a lock the kernel drops when the process dies, so a killed run
    leaves none behind); returns the open lock file (None in the other processes). Two fits writing one folder
    would overwrite each other's checkpoints, metrics and images: the second stops with
    :class:`~ddpm_lightning.io.FolderInUse` before it writes anything."""
    if not is_first_process():
        return None  # the other processes of the same run: rank 0 holds the lock for all of them
    run_dir = _run_dir(trainer_config)
    return io.lock_folder(
        run_dir,
        RUN_LOCK,
        "wait for that `ddpm fit` to end (or stop it), or train into another folder with "
        f"--trainer.default_root_dir (e.g. {run_dir}_2)",
    )


def finish_wandb_run() -> None:
    """End the process's W&B run, if any, so that the next fit in the same process (``ddpm ablate``) starts its own."""
    wandb = sys.modules.get("wandb")  # not imported: no W&B run
    if wandb is not None and wandb.run is not None:
        wandb.finish()


# ------------------------------------------------------------------------------------------------ callbacks
def with_default_callbacks(
    callbacks: Sequence[Callback], names: Sequence[str], ema_decay: float = 0.9999, progress_bar: bool = True
) -> list[Callback]:
    """``callbacks`` followed by each default callback (:func:`default_callbacks`) named in ``names`` of which no
    callback of the same kind is there yet; no progress bar when ``progress_bar`` is False."""
    callbacks = list(callbacks)
    for default in default_callbacks(ema_decay, progress_bar=progress_bar):
        name = type(default).__name__
        kind = _SAME_KIND.get(name, (type(default),))
        if name in names and not any(isinstance(callback, kind) for callback in callbacks):
            callbacks.append(default)
    return callbacks


class DDPMCLI(LightningCLI):
    """LightningCLI over :class:`DiffusionModule` and any LightningDataModule (``data.class_path``)."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parsers of the command, which read configs with :func:`load_config_value`."""
        return super().init_parser(**{"parser_mode": CONFIG_MODE, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--default_callbacks",
            type=list[DefaultCallback],
            default=[cls.__name__ for cls in DEFAULT_CALLBACKS],
            help="Callbacks added to trainer.callbacks unless one of their kind is listed there; leave a name out to "
            "go without it (EMA: the EMA of decay 0.9999 unless trainer.callbacks lists a weight average, e.g. "
            "ddpm_lightning.callbacks.EMA with its decay, or PostHocEMA).",
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="fit only: start from the network weights (and their EMA) of this checkpoint, e.g. one written by "
            "`ddpm convert`: a new run for fine-tuning, not a resume (that is --ckpt_path)",
        )
        for name, kind in FLAT_MODEL_SETTINGS.items():
            new = flat_setting_target(name)
            parser.add_argument(f"--model.{name}", type=kind | None, default=None, help=f"deprecated: {new}")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # today's names first, so that a resumed run compares them with the checkpoint's
        self.config = self._upgrade_model_aliases(self.config, self.config.get("subcommand"))
        # what was given, before Lightning replaces the model section with a checkpoint's hyper-parameters
        self.given_config = deepcopy(self.config)

    def _upgrade_model_aliases(self, config: Namespace, subcommand: str | None) -> Namespace:
        """``config`` with the deprecated flat model settings set where they belong today (:func:`model_aliases`)
        and removed (the EMA's decay is left to :func:`~ddpm_lightning.legacy.ema_decay_alias`)."""
        changes = model_aliases(config.get(str(subcommand), config).model)
        if changes:
            prefix = [str(subcommand)] if subcommand else []
            config = self.parser.parse_object(_nested([*prefix, "model"], changes), config)
        model = config.get(str(subcommand), config).model
        for key in MODEL_ALIASES:
            if key in model:
                del model[key]
        return config

    def _resume(self, ckpt_path: str | Path | None) -> None:
        """Stop when the checkpoint's time budget is spent; apply the model settings given with a checkpoint, or
        refuse those that cannot change (:mod:`ddpm_lightning.cli.resume`)."""
        subcommand = str(self.subcommand)
        config = self.config[subcommand]
        max_time = parse_max_time(config.trainer.get("max_time"))
        if ckpt_path is None or not Path(ckpt_path).is_file():
            return
        spent = spent_time_budget(ckpt_path, max_time)
        if spent is not None:
            _print(spent)
            raise BudgetSpent(0)
        # the settings of an earlier version in today's form; a U-Net stored before a setting was recorded: the
        # value it was trained with
        raw = read_checkpoint(ckpt_path, mmap=True).get("hyper_parameters") or {}
        stored = upgrade_hyperparameters(raw)
        if not stored:
            return
        given = self.given_config[subcommand].model
        from_checkpoint, changed = reconcile_model_settings(given, stored, str(ckpt_path))
        # what the module of an earlier version held and the config holds today, unless given (the EMA's decay)
        from_checkpoint |= {k: v for k, v in config_settings(raw).items() if given.get(k) is None}
        config.model = deepcopy(given)
        if from_checkpoint:
            self.config = self.parser.parse_object({subcommand: {"model": from_checkpoint}}, self.config)
        if changed:
            _print(f"resuming {ckpt_path} with changed settings:\n  " + "\n  ".join(changed))
        # a resumed run writes into its own checkpoint folder: not the mix-up Lightning warns about
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        # loggers write into the run folder (trainer.default_root_dir); a resumed fit continues its W&B run
        follow_run_dir(config.trainer)
        # checkpoints in <run dir>/checkpoints, so `--ckpt_path last` finds the previous run's last.ckpt
        checkpoints_in_run_dir(config.trainer)
        if self.subcommand == "fit":
            config.ckpt_path = resolve_ckpt_path(config.trainer, config.get("ckpt_path"))
            resume_wandb_run(config.trainer, config.get("ckpt_path"))
            resume_logger_versions(config.trainer, config.get("ckpt_path"))
            self._resume(config.ckpt_path)
        # again after _resume (which may replace self.config) and Lightning, which puts a checkpoint's settings into
        # the config: a checkpoint of an earlier version brings its flat settings and its EMA's decay
        self.config = self._upgrade_model_aliases(self.config, self.subcommand)
        config = self.config.get(str(self.subcommand), self.config)
        ema_decay_alias(config, average_kind)
        shape_from_data(config)

    def before_fit(self) -> None:
        """``--init_from``: the network's weights (and their EMA) from a checkpoint, before the run starts."""
        config = self.config_init["fit"]
        if config.get("init_from"):
            if config.get("ckpt_path") is not None:
                raise ValueError(
                    f"--init_from {config.init_from} starts a new run from a checkpoint's weights and --ckpt_path "
                    f"{config.ckpt_path} resumes one: give one of them"
                )
            _print(init_from(self.model, self.trainer, config.init_from))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init.get(str(self.subcommand), self.config_init)
        trainer_config = config.get("trainer")
        if self.subcommand == "fit" and isinstance(self.datamodule, ImageDataModule):
            # said before the trainer starts processes or writes anything: a batch the processes cannot share,
            # images too few for one batch
            accumulate = trainer_config.get("accumulate_grad_batches") or 1
            world_size = cpu_world_size(trainer_config)
            if world_size is not None:
                per_process_batch_size(self.datamodule.batch_size, world_size, accumulate)
            self.datamodule.check_one_batch(accumulate)
        if self.subcommand == "fit":
            # after every check of the settings, before anything is written: a bad setting leaves no folder
            _RUN_LOCKS.append(lock_run_dir(trainer_config))  # released when run_cli returns
        callbacks = with_default_callbacks(
            _entries(kwargs.pop("callbacks", trainer_config.get("callbacks"))),
            config.get("default_callbacks") or [],
            progress_bar=trainer_config.get("enable_progress_bar") is not False,
        )
        try:
            trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        except (MisconfigurationException, TypeError) as err:  # a trainer.* value Lightning refuses
            raise ValueError(f"trainer: {err}") from err
        use_atomic_checkpoints(trainer)
        return trainer


def cpu_world_size(trainer_config: Any) -> int | None:
    """The number of processes of a run on the CPU (``trainer.devices`` x ``trainer.num_nodes``), with a warning when
    one node starts more processes than the CPU has cores; None for a run on an accelerator or ``devices: auto``."""
    accelerator = str(trainer_config.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    devices = trainer_config.get("devices")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if not on_cpu or isinstance(devices, bool) or not isinstance(devices, int | list) or devices == -1:
        return None
    per_node = len(devices) if isinstance(devices, list) else devices
    cores = os.cpu_count() or 1
    if per_node > cores:
        rank_zero_warn(
            f"trainer.devices={per_node} starts {per_node} processes on a CPU of {cores} cores: they share the cores "
            "(slower than one process per core)"
        )
    return per_node * int(trainer_config.get("num_nodes") or 1)


def init_from(module: DiffusionModule, trainer: L.Trainer, path: str | Path) -> str:
    """Load the network weights of the checkpoint ``path`` into ``module`` and their average (EMA), if it has one,
    into the trainer's weight average (:class:`~ddpm_lightning.averaging.WeightAverage`, which otherwise starts from
    the loaded weights); CheckpointError naming the first parameter whose shape differs. Returns what was loaded, in
    words."""
    weights, average = read_net_weights(path)
    check_state_dict_shapes(module.net, weights, str(path))
    module.net.load_state_dict(weights)
    averaging = next((c for c in trainer.callbacks if isinstance(c, WeightAverage)), None)
    if average is not None and averaging is not None:
        check_state_dict_shapes(module.net, average, str(path))
        averaging.start_from(average)
    stored = upgrade_hyperparameters(read_checkpoint(path, mmap=True).get("hyper_parameters") or {}).get("net") or {}
    given = getattr(module.net, "init_args", None) or {}
    differences = [
        f"{k}: checkpoint {v!r}, this run {given[k]!r}"
        for k, v in (stored.get("init_args") or {}).items()
        if k in given and given[k] != v
    ]
    message = f"starting from the network weights of {path}" + (" and their EMA" if average is not None else "")
    return message + "".join(f"\n  network setting {d}" for d in differences)


def _nested(keys: list[str], value: Any) -> Any:
    """``{keys[0]: {keys[1]: ... value}}``."""
    return {keys[0]: _nested(keys[1:], value)} if keys else value


# the run folder locks taken by the fits of run_cli, closed (released) when it returns
_RUN_LOCKS: list[Any] = []


@rank_zero_only
def _print(message: str) -> None:
    print(message, flush=True)


class _NoTips(logging.Filter):
    """Leaves out Lightning's advertisements ("💡 Tip: ... try installing litlogger"), printed on every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def run_cli(argv: Sequence[str] | None = None) -> None:
    """LightningCLI's subcommands (fit, validate, test, predict) on ``argv``; None: on ``sys.argv`` (the console
    script), which LightningCLI reads itself."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in log.filters):
        log.addFilter(_NoTips())
    try:
        with warnings.catch_warnings():
            # harmless, from Lightning's CLI itself: its use of jsonargparse APIs deprecated in jsonargparse 4.49,
            # and its note that `args` were given beside sys.argv (in-process runs: the args are the command's own)
            warnings.filterwarnings("ignore", message=r"(?s).*deprecated in v4\.", module=r"lightning\.pytorch\.cli")
            warnings.filterwarnings("ignore", message=r"(?s)\s*By default only one", module=r"lightning\.pytorch\.cli")
            warnings.filterwarnings(
                "ignore", message=r"LightningCLI's args parameter", module=r"lightning\.pytorch\.cli"
            )
            # validate/test/predict with --ckpt_path: the checkpoint's state_dict already holds the averaged weights,
            # and the callbacks' own states (checkpointing, the average's counters) matter to training only
            warnings.filterwarnings("ignore", message=r"You're using the WeightAveraging callback, but loading")
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to")
            # Lightning's own use of a torch API that torch 2.14 deprecates, on every fit
            warnings.filterwarnings(
                "ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=r"lightning\.pytorch\.utilities"
            )
            DDPMCLI(
                DiffusionModule,
                L.LightningDataModule,
                subclass_mode_data=True,
                args=None if argv is None else list(argv),
                save_config_callback=LogRunConfig,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_class=RunConfigParser,  # a config typo is one line with the closest keys
            )
    finally:
        while _RUN_LOCKS:
            lock = _RUN_LOCKS.pop()
            if lock is not None:
                lock.close()
        finish_wandb_run()


def fit(argv: Sequence[str]) -> None:
    """``ddpm fit ARGV`` in this process, e.g. ``fit(["-c", "configs/demo.yaml", "--trainer.max_steps", "100"])``."""
    run_cli(["fit", *argv])
