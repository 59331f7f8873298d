"""One line for a bad ``ddpm fit`` config instead of jsonargparse's usage dump: the key, the file that holds it and the
closest valid keys (``model.lrr`` in a YAML file -> ``did you mean model.lr?``), and the one reason of a "Union
subtypes" error (a data module whose ``root`` folder does not exist).

:class:`ConfigErrorParser` is LightningCLI's ``parser_class``; :func:`one_line` shortens any other error message. Its
help (:class:`ShortHelpFormatter`) lists at most a few of the "known subclasses" of an option: every importable
``nn.Module`` is one of ``--model.net``, some 800 lines of ``ddpm fit --help``.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = [
    "ConfigErrorParser",
    "ShortHelpFormatter",
    "closest_keys",
    "config_file_with_key",
    "one_line",
    "shorten_known_subclasses",
    "unknown_key_message",
]

_NOT_ACCEPTED = re.compile(
    r"(?:Subcommand '(?P<sub>[\w-]+)'|Group '(?P<group>[\w.-]+)') does not accept option '(?P<key>[^']+)'"
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)", re.S)
_KNOWN_SUBCLASSES = re.compile(r"known subclasses: (?P<list>[^)]*)")
#: the most class paths an option's help lists
MAX_LISTED = 8


def shorten_known_subclasses(help_text: str, limit: int = MAX_LISTED) -> str:
    """A help text whose "known subclasses: A, B, ..." holds at most ``limit`` class paths (this package's first, its
    networks before them) and the number left out."""

    def shorten(match: re.Match[str]) -> str:
        paths = [p.strip() for p in match["list"].split(",") if p.strip()]
        if len(paths) <= limit:
            return match[0]
        # this package's networks (ddpm_lightning.models) first, then its other classes, then the libraries'
        own = sorted((p for p in paths if p.startswith("ddpm_lightning.")), key=lambda p: ".models." not in p)
        kept = (own + [p for p in paths if p not in own])[:limit]
        return f"known subclasses: {', '.join(kept)} and {len(paths) - len(kept)} more importable ones"

    return _KNOWN_SUBCLASSES.sub(shorten, help_text)


class ShortHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter with the lists of known subclasses shortened (:func:`shorten_known_subclasses`)."""

    def _get_help_string(self, action: Any) -> str:
        return shorten_known_subclasses(super()._get_help_string(action))


def closest_keys(key: str, valid: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` valid keys most like ``key`` (a typo), best first, within 10% of the best one's similarity; keys
    under the same group (``model.``) are preferred."""
    group, _, leaf = key.rpartition(".")
    # within the group the names alone are compared: the shared "model." must not make every key look close
    leaves = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == group}
    pairs = [(name, leaves[name], leaf) for name in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.6)]
    others = [k for k in valid if k.rpartition(".")[0] != group]  # a typo in the group's name: "modle.lr"
    pairs = pairs or [(k, k, key) for k in difflib.get_close_matches(key, others, n=n, cutoff=0.6)]
    scores = [difflib.SequenceMatcher(None, typed, name).ratio() for name, _, typed in pairs]
    return [k for (_, k, _), score in zip(pairs, scores, strict=True) if score >= 0.9 * max(scores)]


def parser_keys(parser: Any, command: str | None = None) -> list[str]:
    """The dotted option keys a (jsonargparse) parser accepts, e.g. ``model.lr``, ``trainer.max_steps``; those of
    ``command`` without its prefix when ``parser`` is the one above the subcommands."""
    keys = [str(k) for k in parser.get_defaults().keys()]
    if command and any(k.startswith(f"{command}.") for k in keys):
        keys = [k.removeprefix(f"{command}.") for k in keys if k.startswith(f"{command}.")]
    return sorted({k for k in keys if k not in ("config", "subcommand")})


def _has_key(tree: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def config_file_with_key(argv: Sequence[str], key: str, subcommand: str | None = None) -> str | None:
    """The last ``-c``/``--config`` file of ``argv`` that holds the dotted ``key`` (at its top level or under
    ``subcommand``), or None."""
    files = [b for a, b in zip(argv, argv[1:], strict=False) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    found = None
    for name in files:
        try:
            tree = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _has_key(tree, key) or (subcommand and isinstance(tree, dict) and _has_key(tree.get(subcommand), key)):
            found = name
    return found


def unknown_key_message(key: str, valid: Sequence[str], source: str | None, command: str = "fit") -> str:
    """``KEY in FILE is not an option of `ddpm fit`: did you mean A or B?`` (``--KEY`` when given on the command
    line, ``source`` None)."""
    close = closest_keys(key, valid)
    where = f"{key} in {source}" if source else f"--{key}"
    hint = (
        f"did you mean {' or '.join(close if source else [f'--{k}' for k in close])}?"
        if close
        else f"see `ddpm {command} --help` for the options"
    )
    return f"{where} is not an option of `ddpm {command}`: {hint}"


def one_line(message: str) -> str:
    """jsonargparse's multi-line "Does not validate against any of the Union subtypes" message as its one reason
    (the error of the class that was given, not the "Expected a NoneType" of the alternative); others unchanged."""
    if "Union subtypes" not in message:
        return message
    key = re.search(r'Parser key "([^"]+)"', message)
    reasons = [
        line.strip()[2:].strip()
        for line in message.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    details = [
        line.strip()
        for line in message.splitlines()
        if line.startswith("        ") and line.strip() and not line.strip().startswith("- ")
    ]
    reason = details[0] if details else reasons[0] if reasons else None
    if reason is None:
        return message
    if details and reasons:  # "Problem with given class_path 'X':" then its reason
        cls = re.search(r"class_path '([^']+)'", reasons[0])
        reason += f" (by {cls.group(1)})" if cls else ""
    return f"{key.group(1)}: {reason}" if key else reason


class ConfigErrorParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors for an unknown config key or a failed class are one line on stderr (exit
    status 2); every other error is jsonargparse's own."""

    _argv: list[str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", ShortHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        line = self._one_line(message, ex) if self.exit_on_error else None
        if line is None:
            super().error(message, ex)
        print(f"ddpm: error: {line}", file=sys.stderr)
        raise SystemExit(2)

    def _one_line(self, message: str, ex: Exception | None) -> str | None:
        argv = self._argv or []
        command = next((a for a in argv if a in LightningCLI.subcommands()), None)
        parser = getattr(ex, "subcommand_parser", None) or self
        match = _NOT_ACCEPTED.search(message)
        if match:
            key = match["key"] if match["sub"] else f"{match['group']}.{match['key']}"
            source = config_file_with_key(argv, key, command) or "the config"
            return unknown_key_message(key, parser_keys(parser, command), source, command or "fit")
        match = _UNRECOGNIZED.search(message)
        if match:
            first = match["args"].split()[0]
            if first.startswith("--"):
                key = first[2:].split("=", 1)[0]
                return unknown_key_message(key, parser_keys(parser, command), None, command or "fit")
            return None
        if "Union subtypes" in message:
            return one_line(message)
        return None
