"""The package's dependencies point one way (README, "How it fits together"): a module imports
only from layers below its own, never from inside a function, so no import cycle can come back.
A new module must be placed in a layer here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "robustdistill"

# lowest first; a module may import from earlier layers only (a package counts as one module)
LAYERS = [
    {"errors"},
    {"files", "metrics"},
    {"registry", "distributed", "runs", "report", "timing", "schema", "stats"},
    {"models", "losses", "data", "plots"},
    {"attacks", "checkpoint"},
    {"methods", "robustbench", "checks"},
    {"evaluate"},
    {"config"},
    {"teachers"},
    {"pipeline", "preflight"},
    {"train"},
    {"estimate"},
    {"api", "demo"},
    {"grid"},
    {"compare"},
    {"slurm"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def _internal_imports(path, parts):
    """(top-level module imported, line, inside a function?) for every import of the package."""
    tree = ast.parse(path.read_text())
    package = parts[:-1]  # the package a relative import starts from
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = list(package[: len(package) - (child.level - 1)]) if child.level > 1 else list(package)
                    target = base + (child.module.split(".") if child.module else [])
                    if not target:  # `from . import x` at the top: a module, or a name of the package itself
                        name = child.names[0].name
                        target = [name if name in modules else "__init__"]
                    found.append((target[0], child.lineno, in_function))
                elif child.module and child.module.split(".")[0] == "robustdistill":
                    found.append(
                        (child.module.split(".")[1] if "." in child.module else "__init__", child.lineno, in_function)
                    )
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "robustdistill":
                        found.append(
                            (alias.name.split(".")[1] if "." in alias.name else "__init__", child.lineno, in_function)
                        )
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_module_has_a_layer():
    tops = {parts[0] for _, parts in _modules()} - {"__init__"}
    assert tops <= set(LAYER), f"place these modules in LAYERS: {sorted(tops - set(LAYER))}"


@pytest.mark.parametrize("path, parts", list(_modules()), ids=lambda v: "/".join(v) if isinstance(v, tuple) else "")
def test_imports_point_down_and_none_hides_in_a_function(path, parts):
    me = parts[0]
    for target, line, in_function in _internal_imports(path, parts):
        where = f"{path.relative_to(PACKAGE)}:{line}"
        assert not in_function, f"{where}: an import of robustdistill.{target} inside a function (move it to the top)"
        if target in (me, "__init__"):  # within one package, or the version string
            continue
        assert LAYER[target] < LAYER[me], (
            f"{where}: {me} (layer {LAYER[me]}) imports {target} (layer {LAYER[target]}): dependencies must point down"
        )


def test_the_layer_check_can_fail(tmp_path, monkeypatch):
    """A module that imports upwards, or inside a function, is caught."""
    bad = tmp_path / "robustdistill"
    (bad / "attacks").mkdir(parents=True)
    (bad / "attacks" / "x.py").write_text("from ..config import Config\n\ndef f():\n    from ..errors import check\n")
    found = _internal_imports(bad / "attacks" / "x.py", ("attacks", "x"))
    assert found == [("config", 1, False), ("errors", 4, True)]
    assert LAYER["config"] > LAYER["attacks"]
