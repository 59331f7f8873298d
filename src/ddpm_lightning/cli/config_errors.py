"""One line for a bad ``ddpm fit`` config instead of jsonargparse's usage dump: the key, the file that holds it and the
closest valid keys (``model.lrr`` in a YAML file -> ``did you mean model.lr?``); a bad value with what is allowed
(``--model.objective foo is not one of eps, x0, v``); a config file that does not exist (with the closest one) or is
not YAML (its line, and a tab that indents it); and the one reason of a "Union subtypes" error (a data module whose
``root`` folder does not exist).

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
    "allowed_values",
    "bad_value_message",
    "ShortHelpFormatter",
    "closest_keys",
    "config_file_with_key",
    "missing_config_message",
    "one_line",
    "shorten_known_subclasses",
    "unknown_key_message",
    "yaml_error_message",
]

_NOT_ACCEPTED = re.compile(
    r"(?:Subcommand '(?P<sub>[\w-]+)'|Group '(?P<group>[\w.-]+)') does not accept option '(?P<key>[^']+)'"
)
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)", re.S)
_KNOWN_SUBCLASSES = re.compile(r"known subclasses: (?P<list>[^)]*)")
_MISSING_FILE = re.compile(r'Parser key "(?:config|[\w.]+\.config)": File does not exist: \'(?P<path>[^\']+)\'')
_EXPECTED = re.compile(r'Parser key "(?P<key>[^"]+)":\s*Expected a (?P<type>.+?)\. Got value: (?P<value>[^\n]*)', re.S)
_UNION_OF_TYPES = re.compile(
    r'Parser key "(?P<key>[^"]+)":\s*Does not validate against any of the Union subtypes', re.S
)
_GIVEN_VALUE = re.compile(r"Given value: (?P<value>.*)")
_EXPECTED_TYPE = re.compile(r"^\s*- Expected a (?P<type>.+?)\.?$", re.M)
# what a type of jsonargparse's "Expected a TYPE" allows, in words
_TYPE_WORDS = {
    "<class 'int'>": "an integer",
    "<class 'float'>": "a number",
    "<class 'bool'>": "true or false",
    "<class 'str'>": "a string",
    "<class 'NoneType'>": "null",
}
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
    found = None
    for name in _config_files(argv):
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


def allowed_values(type_text: str) -> str:
    """What jsonargparse's ``Expected a TYPE`` allows, in words: ``typing.Literal['eps', 'x0']`` -> ``one of eps,
    x0``, ``<class 'int'>`` -> ``an integer``; another type as written."""
    literal = re.fullmatch(r"typing\.Literal\[(?P<values>.*)\]", type_text.strip())
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal["values"].split(","))
    return _TYPE_WORDS.get(type_text.strip(), type_text.strip())


def _given_on_command_line(argv: Sequence[str], key: str) -> str | None:
    """The option of ``argv`` that sets ``key`` (``--model.objective``, or ``--model.sampler.name`` for the
    nested parser's key ``name``), or None when no option does."""
    options = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    found = [o for o in options if o == f"--{key}" or o.endswith(f".{key}")]
    return found[-1] if found else None


def bad_value_message(message: str, argv: Sequence[str], command: str | None = None) -> str | None:
    """``--trainer.max_steps abc is not an integer`` (or ``model.objective: foo in FILE is not one of eps, x0, v``)
    for jsonargparse's "Expected a TYPE. Got value: V" of a value of the command line or a config file; None for
    another message."""
    match = _EXPECTED.search(message)
    if match:
        key, value, allowed = match["key"], match["value"].strip(), allowed_values(match["type"])
    else:
        match = _UNION_OF_TYPES.search(message)
        given = _GIVEN_VALUE.search(message)
        types = _EXPECTED_TYPE.findall(message)
        if not match or not given or not types:
            return None
        key, value = match["key"], given["value"].strip()
        allowed = " or ".join(dict.fromkeys(allowed_values(t) for t in types))
    option = _given_on_command_line(argv, key)
    if option is not None:
        where = f"{option} {value}"
    else:
        source = config_file_with_key(argv, key, command)
        if source is None:  # a nested parser's key (``name`` of model.sampler): the full key that holds the value
            key, source = _key_with_value(argv, key, value) or (key, None)
        where = f"{key}: {value} in {source}" if source else f"{key}: {value}"
    return f"{where} is not {allowed}"


def _key_with_value(argv: Sequence[str], leaf: str, value: str) -> tuple[str, str] | None:
    """The last dotted key ending in ``leaf`` whose value is ``value`` in a ``-c`` file of ``argv``, and the file."""
    found = None
    for name in _config_files(argv):
        try:
            tree = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        stack = [("", tree)]
        while stack:
            prefix, node = stack.pop()
            if not isinstance(node, dict):
                continue
            for k, v in node.items():
                dotted = f"{prefix}{k}"
                if str(k) == leaf and str(v) == value:
                    found = (dotted, name)
                stack.append((f"{dotted}.", v))
    return found


def missing_config_message(path: str, argv: Sequence[str]) -> str:
    """``config file configs/dmeo.yaml does not exist: did you mean configs/demo.yaml?`` (the file as typed, and the
    closest YAML file of its folder)."""
    typed = next((a for a in _config_files(argv) if Path(a).resolve() == Path(path).resolve()), path)
    folder = Path(typed).parent
    names = sorted(p.name for p in folder.glob("*.y*ml")) if folder.is_dir() else []
    close = difflib.get_close_matches(Path(typed).name, names, n=1)
    hint = f"did you mean {folder / close[0]}?" if close else "give the path of a YAML config"
    return f"config file {typed} does not exist: {hint}"


def yaml_error_message(argv: Sequence[str]) -> str | None:
    """``FILE line L, column C: a tab indents this line; YAML indents with spaces`` (or the YAML parser's reason)
    for the first ``-c`` file of ``argv`` that is not valid YAML; None when they all are."""
    for name in _config_files(argv):
        try:
            text = Path(name).read_text()
            yaml.safe_load(text)
        except OSError:
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            if mark is None:
                return f"{name} is not valid YAML: {' '.join(str(err).split())}"
            line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
            where = f"{name} line {mark.line + 1}, column {mark.column + 1}"
            if "\t" in line[: mark.column + 1]:
                return f"{where}: a tab indents this line; YAML indents with spaces"
            return f"{where} is not valid YAML: {getattr(err, 'problem', None) or err}"
    return None


def _config_files(argv: Sequence[str]) -> list[str]:
    files = [b for a, b in zip(argv, argv[1:], strict=False) if a in ("-c", "--config")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


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
    """LightningCLI's parser, whose errors are one line on stderr (exit status 2) instead of the usage and the
    message: an unknown key with the closest ones, a bad value with the allowed ones, a missing or unreadable config
    file, a failed class with its one reason; any other message on one line."""

    _argv: list[str] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", ShortHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        line = self._one_line(message, ex)
        if line is None:  # any other error: its message on one line, without the usage
            command = next((a for a in self._argv or [] if a in LightningCLI.subcommands()), "fit")
            line = f"{' '.join(message.split())} (`ddpm {command} --help` lists the options)"
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
        match = _MISSING_FILE.search(message)
        if match:
            return missing_config_message(match["path"], argv)
        if message.startswith("Problems parsing config"):
            return yaml_error_message(argv) or " ".join(message.split())
        bad_value = bad_value_message(message, argv, command)
        if bad_value is not None:
            return bad_value
        if "Union subtypes" in message:
            return one_line(message)
        return None
