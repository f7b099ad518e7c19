"""The package's layout, read from its source: imports point one way between layers and form no cycle, model
families are named only in their own modules, modules stay small, the training entry point reads top to bottom,
and docstrings carry no benchmark run names (the README's "How the code is laid out" describes the layers)."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "docvlm"

# From the bottom up: a module may import from its own layer's other modules and from the layers below, never from
# one above. Within a layer, `SIDEWAYS_FORBIDDEN` lists the directions that are refused too.
LAYERS = (
    ("base", ("errors", "runtime", "flops", "projection")),
    ("shared", ("conversations", "pages", "modes", "prompts")),
    ("families", ("families",)),
    ("fixtures", ("fixtures",)),  # the embedded default's models (of the families) and documents, by name (docvlm:...)
    ("hub", ("hub",)),
    ("speedups", ("speedups",)),
    ("recipe", ("recipe",)),
    ("data and training", ("data", "training")),
    ("prepare", ("prepare",)),
    ("evaluation", ("evaluation",)),
    ("commands", ("plan", "inference", "train")),
    ("entry points", ("cli", "__main__", "__init__")),
)
SIDEWAYS_FORBIDDEN = {("data", "training"), ("training", "data"), ("train", "plan"), ("plan", "train")}
FAMILY_NAMES = re.compile(r"idefics|smolvlm|llava|paligemma|qwen|gemma", re.IGNORECASE)
MAX_LINES = 400


def top(module: str) -> str:
    """The top-level part of a docvlm module name: docvlm.data.checks -> data."""
    return module.split(".")[1] if "." in module else "__init__"


def layer_of(module: str) -> int:
    part = top(module)
    return next(i for i, (_, parts) in enumerate(LAYERS) if part in parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every docvlm module `path` imports, at its top or inside a function (a lazy import is a dependency too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "docvlm":
            for alias in node.names:  # `from docvlm.x import y` may name a module y
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_path(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "docvlm"}
    return {name for name in found if name != "docvlm"}


def module_path(name: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_layers_name_every_part_of_the_package():
    parts = {top(name) for name in graph()}
    named = {part for _, layer in LAYERS for part in layer}
    assert parts == named, f"parts without a layer: {parts - named}; layers naming nothing: {named - parts}"


def test_imports_point_down_the_layers_and_never_sideways_where_forbidden():
    upward = []
    for module, imported in graph().items():
        for other in imported:
            if layer_of(other) > layer_of(module) or (top(module), top(other)) in SIDEWAYS_FORBIDDEN:
                upward.append(f"{module} -> {other}")
    assert upward == []


def test_no_import_cycles():
    """Between modules, lazy imports included; a package's __init__ that collects its own modules (a registry) is
    a face of the package, not a cycle with its members."""
    edges = graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_model_families_are_named_only_in_their_modules_and_the_fixtures():
    """What is specific to a family lives in docvlm.families (docs/new_family.md); the embedded default builds its
    tiny models in docvlm.fixtures. Nothing else names a family or branches on one."""
    named = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if not {"families", "fixtures"} & set(path.relative_to(PACKAGE).parts)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FAMILY_NAMES.search(line)
    ]
    assert named == []


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_train_run_reads_top_to_bottom_in_60_lines():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    run = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 60


RUN_NAMES = re.compile(r"\bruns? [A-Z]{1,2}\b(?! ?[a-z])|\b(?:runs?|bench) [A-Z]{1,2}(?: and [A-Z]{1,2})\b")
MEASUREMENTS = re.compile(
    r"~\d|\d[\d,.]* ?(?:GiB|GB|MB|ms|samples/s|kernels)\b|\d s (?:on|a step)\b|\b\d+\.\d+x\b|\b\d+x (?:slower|faster)\b"
)


def docstrings_and_comments(path: Path):
    """(line, text) of each docstring and comment of a module."""
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc
    for n, line in enumerate(source.splitlines(), 1):
        if "#" in line:
            yield n, line[line.index("#") :]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_docstrings_and_comments_carry_no_run_names_or_measurements(path):
    """Measurements and the history of experiments live in docs/ (and calibration in data files that name their
    runs), not in the code's docstrings and comments."""
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {text.strip()[:80]}"
        for line, text in docstrings_and_comments(path)
        if RUN_NAMES.search(text) or MEASUREMENTS.search(text)
    ]
    assert found == []
