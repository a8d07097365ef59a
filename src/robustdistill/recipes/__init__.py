"""The configs and grids shipped with the package, found by name wherever it is installed.

`digits/*.yaml` are the digits recipes (the demo's, the tests' and the shipped grids' runs;
`digits/README.md` says how their settings were chosen), `grids/*.yaml` the comparison grids.

    raw = recipe("rslad")                       # the raw config mapping of digits/rslad.yaml
    path = grid_file("digits_methods")          # a grid file's path, or the shipped grid of that name
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, Optional

from ..core.errors import UserError
from ..core.schema import read_yaml

RECIPES = files(__name__) / "digits"  # the digits recipes (package data)
GRIDS = files(__name__) / "grids"  # the shipped grids (package data)


def _names(folder) -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_names() -> list[str]:
    return _names(RECIPES)


def grid_names() -> list[str]:
    return _names(GRIDS)


def summary(name: str, kind: str = "digits") -> str:
    """What a shipped recipe (`kind` digits) or grid (`kind` grids) is: the first line of its comments."""
    folder = RECIPES if kind == "digits" else GRIDS
    text = []
    for line in (folder / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        text.append(line.lstrip("#").strip())
    sentence = " ".join(text).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 100 else sentence[:97].rsplit(" ", 1)[0] + " ..."


def recipe(name: str, teachers: Optional[Mapping[str, str | Path]] = None) -> dict[str, Any]:
    """The raw config mapping of digits recipe `name` (digits/<name>.yaml), named after it;
    `teachers` (role -> run folder or checkpoint) replaces the paths of the teachers it uses."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no digits recipe '{name}'; available: {', '.join(recipe_names())}")
    with as_file(path) as local:
        raw = read_yaml(local) | {"name": name}
    for role in raw.get("teachers", {}) if teachers is not None else ():
        raw["teachers"][role]["path"] = str(teachers[role])
    return raw


def grid_file(name: str | Path) -> Path:
    """A grid file's path, or the shipped grid of that name (`digits_methods`)."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = GRIDS / f"{name}.yaml"
    if not shipped.is_file():
        raise UserError(f"no grid file {name} and no shipped grid of that name (shipped: {', '.join(grid_names())})")
    return Path(str(shipped))


def is_shipped(path: str | Path) -> bool:
    """Whether a grid file is one shipped with the package."""
    return str(path).startswith(str(GRIDS))
