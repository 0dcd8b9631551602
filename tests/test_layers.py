"""The layers, read from the imports of every module (no import-linter: a page of ast does it, and
the rule for training's use of the data pipeline is ours).

    base (models/base/)  <-  models  <-  data_pipeline
                                         <-  training (of data_pipeline: the store's read API only)
                                                 <-  launch (everything)

Base modules import nothing of ours but each other. An import inside a function is how a module
would hide a cycle, so our modules import each other at the top; the exceptions keep a heavy
dependency out of a process that does not need it, and say so in a `# lazy:` comment on the import
or just above it. The command line (launch/cli.py) imports each command's module when that command
runs: `unclip --help` must not load torch, Ray and DeepSpeed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("data_pipeline", "training", "models", "launch")
MAY_IMPORT = {
    "base": {"base"},
    "models": {"base", "models"},
    "data_pipeline": {"base", "models", "data_pipeline", "store read API"},
    "training": {"base", "models", "training", "store read API"},
    "launch": {"base", "models", "data_pipeline", "training", "store read API", "launch"},
}
STORE_READ_API = "data_pipeline.store"
LAZY_BY_DESIGN = {"launch/cli.py"}


def layer(module: str) -> str:
    if module == "models.base" or module.startswith("models.base."):
        return "base"
    if module == STORE_READ_API:
        return "store read API"
    return module.split(".")[0]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def own_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function without a `# lazy:` reason) for every import of
    one of our packages."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, str(path))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from data_pipeline import store` imports the module data_pipeline.store
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names
            ]
        else:
            continue
        reasoned = "# lazy:" in lines[node.lineno - 1] or _reason_above(lines, node.lineno - 1)
        hidden = id(node) in inside and not reasoned
        found += [(node.lineno, name, hidden) for name in names if name.split(".")[0] in PACKAGES]
    return found


def _reason_above(lines: list[str], index: int) -> bool:
    """Whether the block of imports and comments right above line `index` carries `# lazy:`."""
    for line in reversed(lines[:index]):
        stripped = line.strip()
        if "# lazy:" in stripped:
            return True
        if stripped and not stripped.startswith(("#", "import ", "from ")):
            return False
    return False


MODULES = modules()


def test_every_package_imports_only_the_layers_below_it():
    broken = []
    for module, path in MODULES.items():
        allowed = MAY_IMPORT[layer(module) if layer(module) != "store read API" else "data_pipeline"]
        for line, imported, _ in own_imports(path):
            if layer(imported) not in allowed:
                broken.append(
                    f"{path.relative_to(REPO)}:{line}: {layer(module)} imports {imported} ({layer(imported)})"
                )
    assert not broken, "layer contract broken:\n" + "\n".join(broken)


def test_our_modules_import_each_other_at_the_top():
    hidden = [
        f"{path.relative_to(REPO)}:{line}: {imported}"
        for path in MODULES.values()
        if str(path.relative_to(REPO)) not in LAZY_BY_DESIGN
        for line, imported, in_function in own_imports(path)
        if in_function
    ]
    assert not hidden, "imports of our own modules inside functions:\n" + "\n".join(hidden)


def test_every_import_inside_a_function_says_why():
    """Any module, ours or not, is imported at the top unless keeping it out of a process is the
    point (a `# lazy:` reason): an import hidden in a function is otherwise a cost or a cycle
    nobody sees."""
    unexplained = []
    for path in MODULES.values():
        if str(path.relative_to(REPO)) in LAZY_BY_DESIGN:
            continue
        text = path.read_text()
        lines = text.splitlines()
        for function in ast.walk(ast.parse(text)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node is not function:
                    # the reason may end any line of the statement: the formatter puts a comment
                    # after the closing parenthesis of an import it wraps
                    statement = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
                    if not any("# lazy:" in line for line in statement) and not _reason_above(lines, node.lineno - 1):
                        unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a '# lazy:' reason:\n" + "\n".join(
        sorted(set(unexplained))
    )


@pytest.mark.parametrize("source", ["from launch.config import Config", "from data_pipeline import embed"])
def test_the_check_sees_a_broken_layer(tmp_path, source):
    """The contract test itself catches what it is for: training reaching into launch or into the
    data pipeline beyond the store."""
    path = tmp_path / "stage.py"
    path.write_text(f"def f():\n    {source}\n")
    [(line, imported, in_function)] = own_imports(path)
    assert in_function and layer(imported) not in MAY_IMPORT["training"]
