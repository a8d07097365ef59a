"""The package's folders show its architecture, and its dependencies point one way.

Each subpackage is one concern and one layer: a module imports only from packages in layers below
its own (or from its own package), never from inside a function, and never from its own package's
`__init__` (base classes live in their own modules), so no import cycle can come back. Within a
package the modules form no cycle either. No public name is defined twice for different things.

The docs' architecture table is drawn from here: `python tests/test_structure.py
docs/explanation/architecture.md` rewrites it (the layers below, each package's modules and the first
sentence of its docstring), and a test fails when the page's copy differs.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "robustdistill"

# lowest first; a module may import from packages of earlier layers only (and from its own package)
LAYERS = [
    {"core"},
    {"storage", "recipes"},
    {"data"},
    {"models"},
    {"attacks"},
    {"methods", "evaluation"},
    {"training"},
    {"studies", "export"},
    {"api"},
    {"cli"},
    {"__main__", "__init__"},  # the front door: `import robustdistill` offers the public API
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    """(path, dotted module name relative to the package) of every module; a package is its __init__."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, me: str):
    """(dotted module imported, line, inside a function?) for every import of the package: a
    package's `__init__` is its own name ("models"), the top-level one "__init__"."""
    tree = ast.parse(path.read_text())
    is_init = path.name == "__init__.py"
    package = me.split(".") if is_init else me.split(".")[:-1]
    if me == "__init__":
        package = []
    found = []

    def target_of(base: list[str], names: list[str]):
        for name in names:  # `from . import sources`: a module; `from . import X`: a name of the package
            dotted = ".".join([*base, name])
            yield dotted if _is_module(dotted) else (".".join(base) or "__init__")

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)] if child.level > 1 else list(package)
                    base = [*base, *(child.module.split(".") if child.module else [])]
                elif child.module and child.module.split(".")[0] == "robustdistill":
                    base = child.module.split(".")[1:]
                else:
                    base = None
                if base is not None:
                    if child.module is None or (not child.level and base == []):
                        targets = set(target_of(base, [a.name for a in child.names]))
                    else:
                        targets = {".".join(base) or "__init__"}
                    found.extend((t, child.lineno, in_function) for t in sorted(targets))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "robustdistill":
                        found.append((".".join(alias.name.split(".")[1:]) or "__init__", child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def test_every_package_has_a_layer():
    tops = {_top(name) for _, name in _modules()}
    assert tops <= set(LAYER), f"place these in LAYERS: {sorted(tops - set(LAYER))}"
    assert set(LAYER) <= tops, f"LAYERS names what is not there: {sorted(set(LAYER) - tops)}"


@pytest.mark.parametrize("path, me", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down_and_none_hides_in_a_function(path, me):
    for target, line, in_function in _imports(path, me):
        where = f"{path.relative_to(PACKAGE)}:{line}"
        assert not in_function, f"{where}: an import of robustdistill.{target} inside a function (move it to the top)"
        assert target != "__init__", f"{where}: {me} imports the package's front door; import from the defining module"
        if _top(target) == _top(me):
            package = me.rsplit(".", 1)[0] if path.name != "__init__.py" and "." in me else None
            assert target != package, (
                f"{where}: {me} imports its own package's __init__: import from the module that defines the name"
            )
            continue
        assert LAYER[_top(target)] < LAYER[_top(me)], (
            f"{where}: {me} (layer {LAYER[_top(me)]}) imports {target} (layer {LAYER[_top(target)]}): "
            "dependencies must point down"
        )


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (a package's __init__ importing its own modules left out:
    that is how a package collects what it offers, not a dependency of those modules)."""
    graph = {}
    for path, me in _modules():
        targets = {t for t, _, _ in _imports(path, me) if t != me}
        if path.name == "__init__.py":
            targets = {t for t in targets if not t.startswith(me + ".")}
        graph[me] = targets
    return graph


def _cycle(graph: dict[str, set[str]]):
    """One import cycle of `graph` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_back():
    cycle = _cycle(_graph())
    assert cycle is None, f"an import cycle: {' -> '.join(cycle)}"


def test_the_structure_checks_can_fail(tmp_path):
    """An import upwards, inside a function, into the own package's __init__, or in a circle is caught."""
    bad = tmp_path / "x.py"
    bad.write_text("from ..training.config import Config\n\ndef f():\n    from ..core.errors import require\n")
    assert _imports(bad, "attacks.x") == [("training.config", 1, False), ("core.errors", 4, True)]
    assert LAYER["training"] > LAYER["attacks"]
    bad.write_text("from . import METHODS\n")
    assert _imports(bad, "methods.x") == [("methods", 1, False)]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    other = tmp_path / "y.py"
    other.write_text("def write_report():\n    pass\n\n\ndef _helper():\n    pass\n")
    bad.write_text("write_report = None\n_helper = 1\nlog = 2\n")
    assert _public_definitions([(bad, "a.x"), (other, "b.y")]) == {"write_report": ["a.x", "b.y"]}


def _public_definitions(modules=None):
    """name -> the modules defining it at top level (functions, classes, constants)."""
    defined = {}
    for path, me in modules or _modules():
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign) and not _is_type_variable(node.value):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for name in names:
                if not name.startswith("_") and name != "log":  # each module's logger is the one logger
                    defined.setdefault(name, []).append(me)
    return defined


def _is_type_variable(value: ast.expr) -> bool:
    """`T = TypeVar("T")`: a module's own type parameter, not a name it offers."""
    return isinstance(value, ast.Call) and getattr(value.func, "id", None) == "TypeVar"


def test_no_public_name_is_defined_twice():
    twice = {name: where for name, where in _public_definitions().items() if len(where) > 1}
    assert not twice, f"defined in more than one module (rename one): {twice}"


# --- the docs' architecture table, drawn from the layers and the packages' docstrings -----------

ARCHITECTURE = ROOT / "docs" / "explanation" / "architecture.md"

BEGIN, END = "<!-- architecture:begin -->", "<!-- architecture:end -->"


def _summary(dotted: str) -> str:
    """The first sentence of a package's or module's docstring."""
    path = PACKAGE.joinpath(*dotted.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    return first.split(". ")[0].rstrip(".") + "."


def architecture_table() -> str:
    rows = ["| layer | package | modules | what |", "|---|---|---|---|"]
    for i, layer in enumerate(LAYERS):
        for name in sorted(layer):
            folder = PACKAGE / name
            if folder.is_dir():
                inner = [f"`{p.stem}`" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]
                data = [f"`{p.name}/`" for p in sorted(folder.iterdir()) if p.is_dir() and p.name != "__pycache__"]
                modules = ", ".join(inner + data)
                label = f"`{name}/`"
            else:
                modules, label = "", f"`{name}`"
            rows.append(f"| {i} | {label} | {modules} | {_summary(name)} |")
    return "\n".join(rows)


def _section(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_the_architecture_table_is_drawn_from_the_package():
    text = ARCHITECTURE.read_text()
    assert BEGIN in text and END in text, f"{ARCHITECTURE} needs the lines {BEGIN} and {END}"
    assert _section(text) == architecture_table(), (
        f"the architecture table is out of date: python tests/test_structure.py {ARCHITECTURE.relative_to(ROOT)}"
    )


if __name__ == "__main__":  # python tests/test_structure.py docs/explanation/architecture.md: rewrite it
    page = Path(sys.argv[1])
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    page.write_text(f"{head}{BEGIN}\n{architecture_table()}\n{END}{rest.split(END, 1)[1]}")
