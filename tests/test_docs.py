"""The README and docs/ stay true: every relative link resolves (files and #anchors), every ``ddpm ...`` command
quoted in a code block parses, docs/cli.md is the commands' current ``--help``, and the README's Python example
trains and samples."""

import importlib
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ddpm_lightning.sampling import load_module

REPO = Path(__file__).parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FIT_SUBCOMMANDS = ("fit", "validate", "test", "predict")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _prose_and_code(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside code fences, and each fenced block as (language, lines)."""
    prose, blocks, block, language = [], [], None, ""
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and block is None:
            block, language = [], fence.group(1)
        elif line.startswith("```") and block is not None:
            blocks.append((language, block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def _anchors(path: Path) -> set[str]:
    prose, _ = _prose_and_code(path.read_text())
    return {_slug(line.lstrip("#")) for line in prose if re.match(r"^#{1,6} ", line)}


def broken_links(page: Path) -> list[str]:
    """Every relative link of ``page`` whose file or #anchor does not exist."""
    prose, _ = _prose_and_code(page.read_text())
    broken = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    return broken


def quoted_commands(page: Path) -> list[list[str]]:
    """The ``ddpm ...`` commands of ``page``'s shell code blocks as argument lists (without ``ddpm``): continuation
    lines joined, comments dropped, optional ``[--flag value]`` unwrapped, commands with an elided ``...`` left out."""
    return quoted_commands_of(page.read_text())


def quoted_commands_of(text: str) -> list[list[str]]:
    """The ``ddpm ...`` commands of the shell code blocks of a page's ``text`` (see :func:`quoted_commands`)."""
    _, blocks = _prose_and_code(text)
    commands = []
    for language, lines in blocks:
        if language not in ("bash", "sh", "shell", ""):
            continue
        for line in "\n".join(lines).replace("\\\n", " ").splitlines():
            if not line.startswith("ddpm "):
                continue
            line = re.sub(r"\[(--[^\[\]]*)\]", r"\1", line)
            words = shlex.split(line, comments=True)[1:]
            if "..." not in words:
                commands.append(words)
    return commands


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _fit_parser():
    """LightningCLI's parser of ``ddpm fit | validate | test | predict``, built as ``ddpm`` builds it, without
    instantiating anything."""
    from ddpm_lightning.cli import fit

    def stop(self, parser, args):
        raise _Parsed(parser)

    original = fit.DDPMCLI.parse_arguments
    fit.DDPMCLI.parse_arguments = stop
    try:
        fit.run_cli(["fit"])
    except _Parsed as parsed:
        return parsed.parser
    finally:
        fit.DDPMCLI.parse_arguments = original
    raise AssertionError("DDPMCLI did not parse its arguments")


def command_errors(commands: list[list[str]]) -> list[str]:
    """Each command that its parser refuses, with the parser's message."""
    from ddpm_lightning.cli import COMMANDS

    errors, fit_parser = [], None
    for words in commands:
        name, args = words[0], words[1:]
        try:
            if name in FIT_SUBCOMMANDS:
                fit_parser = fit_parser or _fit_parser()
                fit_parser.parse_args([name, *(a for a in args if a != "--print_config")])
            elif name in COMMANDS:
                parser = importlib.import_module(COMMANDS[name][0]).build_parser()
                # ablate hands the arguments it does not know to `ddpm fit`
                (parser.parse_known_args if name == "ablate" else parser.parse_args)(args)
            else:
                errors.append(f"ddpm {shlex.join(words)}: no such command")
        except SystemExit:
            errors.append(f"ddpm {shlex.join(words)}: refused by its parser (message above)")
    return errors


@pytest.mark.unit
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


@pytest.mark.unit
def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# A title\n\n## Some `code` (here)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#some-code-here) [ok](#top) [web](https://example.org/x)\n# Top\n"
        "[gone](missing.md) [no anchor](other.md#nowhere)\n```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md: no such file", "other.md#nowhere: no heading #nowhere in other.md"]


@pytest.mark.integration
def test_every_quoted_ddpm_command_parses(monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name configs relative to the repository
    commands = [words for page in PAGES for words in quoted_commands(page)]
    assert {"fit", "sample", "evaluate", "nll", "ablate", "convert"} <= {words[0] for words in commands}
    assert command_errors(commands) == []


@pytest.mark.integration
def test_the_command_check_finds_a_bad_flag_and_a_missing_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nddpm sample --ckpt a.ckpt --out s/ --nonsense 1\nddpm fit -c configs/no_such.yaml\n"
        "ddpm fit -c configs/demo.yaml \\\n    --model.lr=1e-3   # a comment\nddpm evaluate ... --num 5\n```\n"
    )
    commands = quoted_commands(page)
    assert commands == [
        ["sample", "--ckpt", "a.ckpt", "--out", "s/", "--nonsense", "1"],
        ["fit", "-c", "configs/no_such.yaml"],
        ["fit", "-c", "configs/demo.yaml", "--model.lr=1e-3"],
    ]
    assert len(command_errors(commands)) == 2


@pytest.mark.integration
def test_the_cli_reference_is_the_commands_current_help():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_cli_docs
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert (REPO / "docs" / "cli.md").read_text() == gen_cli_docs.render(), "run python scripts/gen_cli_docs.py"


def _brace_expansions(name: str) -> list[str]:
    """``a/{b,c}.yaml`` -> [``a/b.yaml``, ``a/c.yaml``]: the spelling the config table uses for a family."""
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    return [e for part in match.group(1).split(",") for e in _brace_expansions(name.replace(match.group(0), part, 1))]


@pytest.mark.unit
def test_every_shipped_config_is_in_the_config_table():
    table = [line for line in (REPO / "docs" / "config.md").read_text().splitlines() if line.startswith("| `configs/")]
    listed = {e for line in table for name in re.findall(r"`(configs/[^`*]+)`", line.split("|")[1])
              for e in _brace_expansions(name)}  # fmt: skip
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    presets = {p for p in shipped if p.startswith("configs/model/")}  # listed by name in the presets' row
    assert sorted(shipped - presets - listed) == [], "add them to docs/config.md's table"
    assert sorted(listed - shipped) == [], "the table names configs that do not exist"
    presets_row = next(line for line in table if line.startswith("| `configs/model/"))
    assert [p for p in presets if f"`{Path(p).stem}`" not in presets_row] == []


@pytest.mark.unit
def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.integration
def test_the_readmes_python_example_trains_and_samples(tmp_path, monkeypatch):
    _, blocks = _prose_and_code((REPO / "README.md").read_text())
    [example] = ["\n".join(lines) for language, lines in blocks if language == "python"]
    assert "max_steps=1100" in example
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)
    try:
        exec(example.replace("max_steps=1100", "max_steps=2, limit_val_batches=0"), scope)
    finally:
        lightning_log.removeHandler(handler)
    assert not [m for m in logged if "was not set" in m], logged  # the example sets what it means
    x0 = scope["x0"]
    assert x0.shape == (16, 1, 28, 28) and x0.min() >= -1 and x0.max() <= 1
    loaded = load_module(tmp_path / "runs" / "python" / "digits.ckpt")
    # the checkpoint holds the weights that drew x0 (the EMA)
    torch.testing.assert_close(loaded.sample(16, scope["SamplerConfig"]("dpmpp_2m", steps=20), seed=0), x0)


def _run_dir(words: list[str]) -> str:
    """The run folder a quoted ``ddpm fit`` writes: its ``--trainer.default_root_dir``, else that of the last config
    that sets one."""
    folder = None
    for flag, value in zip(words, words[1:], strict=False):
        if flag in ("-c", "--config"):
            trainer = (yaml.safe_load((REPO / value).read_text()) or {}).get("trainer") or {}
            folder = trainer.get("default_root_dir", folder)
    given = [w.split("=", 1)[1] for w in words if w.startswith("--trainer.default_root_dir=")]
    return given[-1] if given else folder


def test_your_own_images_evaluates_the_checkpoints_its_own_runs_wrote():
    """Every --ckpt of the "Your own images" block is the last.ckpt of the `ddpm fit` quoted last before it (the CPU
    check is followed by commands on its own checkpoint, not on the full run's)."""
    text = (REPO / "docs" / "interop.md").read_text()
    section = text[text.index("## Your own images") :]
    written, read = None, 0
    for words in quoted_commands_of(section):
        if words[0] == "fit":
            written = f"{_run_dir(words)}/checkpoints/last.ckpt"
        for flag, value in zip(words, words[1:], strict=False):
            if flag == "--ckpt":
                assert value == written, f"{' '.join(words)}: the fit above writes {written}, not {value}"
                read += 1
    assert read >= 2
