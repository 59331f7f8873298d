"""The code's rules that keep it easy to change, each shown to fail on a planted violation: no sampler named in a
comparison outside its own file, no name of an earlier version outside :mod:`ddpm_lightning.legacy`, every module
named in docs/index.md's layout."""

import ast
import re
from pathlib import Path

import pytest

from ddpm_lightning.choices import SAMPLERS
from ddpm_lightning.legacy import CALLBACK_SAMPLER_ALIASES, SAMPLER_CALLBACKS

pytestmark = pytest.mark.unit
REPO = Path(__file__).parents[1]
PACKAGE = REPO / "src" / "ddpm_lightning"
MODULES = {
    ".".join(("ddpm_lightning", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
    for p in PACKAGE.rglob("*.py")
}


# ------------------------------------------------------------------------------------------------ samplers
def sampler_checks(tree: ast.AST, own: str | None = None) -> list[str]:
    """Comparisons with a sampler's name (``config.name == "heun"``, ``name in ("ddim", "ddpm")``) other than
    ``own``: what a sampler needs belongs in its own file and options, not in checks elsewhere."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                named = {v.value for v in values if isinstance(v, ast.Constant) and v.value in SAMPLERS} - {own}
                found += [f"line {node.lineno}: {ast.unparse(node)}" for _ in named]
    return found


def test_no_sampler_is_named_in_a_check_outside_its_own_file():
    found = {}
    for name, path in MODULES.items():
        own = name.rsplit(".", 1)[-1] if name.startswith("ddpm_lightning.diffusion.samplers.") else None
        if lines := sampler_checks(ast.parse(path.read_text()), own):
            found[name] = lines
    assert found == {}


def test_the_sampler_check_finds_a_check_of_a_samplers_name():
    planted = "steps = (nfe + 1) // 2 if base.name == 'heun' else nfe\nok = config.name == 'mine'\n"
    assert sampler_checks(ast.parse(planted)) == ["line 1: base.name == 'heun'"]
    assert sampler_checks(ast.parse("if name in ('ddim', 'x'): pass\n")) == ["line 1: name in ('ddim', 'x')"]
    assert sampler_checks(ast.parse(planted), own="heun") == []


# ------------------------------------------------------------------------------------------------ old names
#: names of earlier versions that only :mod:`ddpm_lightning.legacy` may know (as a string, a parameter, a variable or
#: an attribute)
OLD_NAMES = ("sample_steps", "sample_spacing", "--nfe", "unet.", "LEGACY_SETTINGS", "_ALIAS_TYPES", "adam_betas",
             "--ema-decay")  # fmt: skip
#: old model settings whose name is still a current name of something else (``GuideTraining(ema_decay=...)``,
#: ``default_callbacks(ema_decay)``): old as the string ``"ema_decay"`` or ``model.ema_decay``, an attribute of
#: ``hparams``/``model`` or a parameter of ``DiffusionModule``
OLD_MODEL_SETTINGS = ("ema_decay",)


def old_names(tree: ast.AST) -> list[str]:
    """Each use of a name of :data:`OLD_NAMES` in ``tree``: in a string (``"--nfe"``, ``"unet.*"``) or as an
    identifier (``sample_steps=``, ``x.sample_steps``); and of a model setting of :data:`OLD_MODEL_SETTINGS`."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [n for n in OLD_NAMES if n in node.value.split() or node.value.startswith(n)]
            names += [n for n in OLD_MODEL_SETTINGS if node.value == n or f"model.{n}" in node.value]
        elif isinstance(node, (ast.Name, ast.arg, ast.Attribute, ast.keyword, ast.alias)):
            ident = {ast.Name: "id", ast.arg: "arg", ast.Attribute: "attr", ast.keyword: "arg", ast.alias: "name"}
            names = [n for n in OLD_NAMES if getattr(node, ident[type(node)]) == n]
            if isinstance(node, ast.Attribute) and getattr(node.value, "attr", None) in ("hparams", "model"):
                names += [n for n in OLD_MODEL_SETTINGS if node.attr == n]
        elif isinstance(node, ast.ClassDef) and node.name == "DiffusionModule":
            inits = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"]
            found += [(a.lineno, a.arg) for f in inits for a in f.args.args if a.arg in OLD_MODEL_SETTINGS]
        found += [(node.lineno, name) for name in names if hasattr(node, "lineno")]
    return [f"line {line}: {name}" for line, name in sorted(found)]


def old_callback_arguments(tree: ast.AST) -> list[str]:
    """Each flat sampler argument of earlier versions of the sampling callbacks (``num_steps``, ``eta``, ``spacing``
    of :data:`~ddpm_lightning.legacy.SAMPLER_CALLBACKS`) in ``tree``: a keyword of a call of such a callback or a
    parameter of its ``__init__``. Only there: elsewhere ``eta`` and ``spacing`` are a sampler's fields and
    ``num_steps`` a method of ``SamplerConfig``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in SAMPLER_CALLBACKS:
                found += [(k.lineno, f"{name}({k.arg}=)") for k in node.keywords if k.arg in CALLBACK_SAMPLER_ALIASES]
        elif isinstance(node, ast.ClassDef) and node.name in SAMPLER_CALLBACKS:
            for init in (f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"):
                params = [*init.args.args, *init.args.kwonlyargs]
                found += [(p.lineno, f"{node.name}({p.arg})") for p in params if p.arg in CALLBACK_SAMPLER_ALIASES]
    return [f"line {line}: {name}" for line, name in sorted(found)]


def test_no_old_name_outside_the_legacy_module():
    found = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if name != "ddpm_lightning.legacy" and (lines := old_names(tree) + old_callback_arguments(tree)):
            found[name] = lines
    assert found == {}


def test_the_old_name_check_finds_an_old_name_in_a_string_a_parameter_and_an_attribute():
    planted = (
        "def f(sample_steps=None):\n    return argv == '--nfe' or key.startswith('unet.') or cfg.sample_spacing\n"
        "steps = config.steps\n"
    )
    assert old_names(ast.parse(planted)) == ["line 1: sample_steps", "line 2: --nfe", "line 2: sample_spacing",
                                             "line 2: unet."]  # fmt: skip


def test_the_old_callback_argument_check_finds_them_in_a_call_and_a_signature_only():
    planted = (
        "callback = callbacks.FIDCallback(every_n_steps=10, num_steps=20)\n"
        "class DemoReport:\n    def __init__(self, sampler=None, *, spacing=None):\n        pass\n"
        "SamplingCallback(sampler=SamplerConfig('ddim', 20, eta=1.0, spacing='quadratic'))\n"
        "steps = config.num_steps(T)\n"
    )
    found = old_callback_arguments(ast.parse(planted))
    assert found == ["line 1: FIDCallback(num_steps=)", "line 3: DemoReport(spacing)"]


def test_the_old_name_check_finds_the_ema_decay_as_a_model_setting_only():
    planted = (
        "class DiffusionModule:\n    def __init__(self, lr=1.0, ema_decay=None):\n        pass\n"
        "decay = config.model.get('ema_decay') or module.hparams.ema_decay\n"
        "warn('model.ema_decay is deprecated')\n"
        "class GuideTraining:\n    def __init__(self, ema_decay=0.95):\n        self.ema_decay = ema_decay\n"
        "callbacks = default_callbacks(ema_decay=0.9)\n"
    )
    assert old_names(ast.parse(planted)) == ["line 2: ema_decay", "line 4: ema_decay", "line 4: ema_decay",
                                             "line 5: ema_decay"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the docs' layout
def layout_block(text: str) -> str:
    """The code block under ``## Layout`` of docs/index.md."""
    section = text.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def missing_from_layout(layout: str, modules: dict[str, Path]) -> list[str]:
    """The modules under src/ the layout does not name: a top-level module as ``name.py``, a package as
    ``name/``, a module of a package by its name (``ema``, ``gaussian.py``)."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:\.py|/)?", layout))
    missing = []
    for name in sorted(modules):
        parts = name.split(".")[1:]
        if not parts or parts[-1] == "__main__":
            continue
        if len(parts) == 1:
            wanted = {f"{parts[0]}/"} if modules[name].name == "__init__.py" else {f"{parts[0]}.py"}
        else:
            wanted = {parts[-1], f"{parts[-1]}.py", f"{parts[-1]}/"}
        if not wanted & words:
            missing.append(name)
    return missing


def test_the_docs_layout_names_every_module_under_src():
    assert missing_from_layout(layout_block((REPO / "docs" / "index.md").read_text()), MODULES) == []


def test_the_layout_check_finds_a_module_left_out():
    layout = "src/ddpm_lightning/\n  io.py  atomic writes\n  callbacks/  ema, fid\n"
    modules = {
        "ddpm_lightning.io": PACKAGE / "io.py",
        "ddpm_lightning.guard": PACKAGE / "guard.py",
        "ddpm_lightning.callbacks": PACKAGE / "callbacks" / "__init__.py",
        "ddpm_lightning.callbacks.ema": PACKAGE / "callbacks" / "ema.py",
        "ddpm_lightning.callbacks.bpd": PACKAGE / "callbacks" / "bpd.py",
    }
    assert missing_from_layout(layout, modules) == ["ddpm_lightning.callbacks.bpd", "ddpm_lightning.guard"]


# ------------------------------------------------------------------------------------------------ sizes
MAX_FUNCTION_LINES = 80
MAX_MODULE_PARAMETERS = 18
MAX_LIT_MODULE_LINES = 350
#: the one function allowed to be longer: the U-Net's constructor, the paper's architecture read top to bottom
LONG_FUNCTIONS_ALLOWED = {"ddpm_lightning.models.unet.UNet.__init__"}
#: what is still over the limits, at its size today: a ratchet (a size may only go down; a paid debt leaves the list)
DEBTS: dict[str, int] = {}


def function_sizes(tree: ast.AST, module: str) -> dict[str, int]:
    """The lines of every function of ``tree`` (decorators included), by qualified name."""
    sizes = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                    sizes[name] = child.end_lineno - first + 1
                visit(child, name)

    visit(tree, module)
    return sizes


def oversized(modules: dict[str, Path]) -> dict[str, int]:
    """Everything over the limits: functions longer than :data:`MAX_FUNCTION_LINES` (but the allowed ones), the
    module's ``__init__`` parameters over :data:`MAX_MODULE_PARAMETERS`, lit_module.py over its lines."""
    found = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for function, lines in function_sizes(tree, name).items():
            if lines > MAX_FUNCTION_LINES and function not in LONG_FUNCTIONS_ALLOWED:
                found[function] = lines
        if name == "ddpm_lightning.lit_module":
            lines = len(path.read_text().splitlines())
            if lines > MAX_LIT_MODULE_LINES:
                found["lit_module.py lines"] = lines
            init = next(
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.ClassDef) and n.name == "DiffusionModule"
                for n in n.body
                if isinstance(n, ast.FunctionDef) and n.name == "__init__"
            )
            parameters = len(init.args.args) - 1 + len(init.args.kwonlyargs)
            if parameters > MAX_MODULE_PARAMETERS:
                found["DiffusionModule.__init__ parameters"] = parameters
    return found


def test_no_function_or_module_grows_past_the_size_limits():
    found = oversized(MODULES)
    grown = {k: v for k, v in found.items() if v > DEBTS.get(k, 0)}
    paid = sorted(set(DEBTS) - set(found))
    assert grown == {}, f"over the limits (functions <= {MAX_FUNCTION_LINES} lines; debts may only shrink): {grown}"
    assert paid == [], f"within the limits now: take them out of DEBTS: {paid}"


def test_the_size_check_finds_a_long_function_and_too_many_parameters(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 80 + "\n\nclass A:\n    def g(self):\n        return 1\n")
    lit = tmp_path / "lit_module.py"
    params = ", ".join(f"a{i}=0" for i in range(19))
    lit.write_text(f"class DiffusionModule:\n    def __init__(self, {params}):\n        pass\n")
    found = oversized({"ddpm_lightning.long": long, "ddpm_lightning.lit_module": lit})
    assert found == {"ddpm_lightning.long.f": 81, "DiffusionModule.__init__ parameters": 19}
