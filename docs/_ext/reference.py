"""The reference pages' generated parts: directives that render the code's own descriptions, as
Markdown (the pages are MyST), at build time.

    ```{rd-cli}            every command of `robustdistill`, from its argparse parsers
    ```{rd-config}         every config key: type, default and meaning (the comment after each field)
    ```{rd-method-options} every method's own `method.*` keys
    ```{rd-grid}           a comparison grid's keys, and its `slurm:` section's
    ```{rd-methods}        every method: paper, teachers, equations and differences from the official code
    ```{rd-docstring} M    module M's docstring, verbatim
    ```{rd-registries}     the registered models, methods, attacks, sanity checks and datasets, the shipped recipes
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import typing

from sphinx.util.docutils import SphinxDirective

from robustdistill.attacks import ATTACKS
from robustdistill.cli import build_parser
from robustdistill.core.schema import field_comments
from robustdistill.data import DATASETS
from robustdistill.evaluation.checks import registered
from robustdistill.methods import METHODS
from robustdistill.models import MODELS
from robustdistill.recipes import grid_names, recipe_names, summary
from robustdistill.studies.grid import Grid, SlurmSpec
from robustdistill.training.config import Config

KEYS = ["key", "type", "default", "meaning"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown (MyST) pipe table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def _literal(text: str) -> str:
    return "````text\n" + text.rstrip() + "\n````\n"


def _code(text: str) -> str:
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _type(tp) -> str:
    name = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return _code(name or str(tp).replace("typing.", "").replace("robustdistill.", ""))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _code(repr(f.default))
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(a section)" if dataclasses.is_dataclass(value) else _code(repr(value))
    return "(required)"


def _fields(cls, prefix: str, above: tuple = ()) -> list[list[str]]:
    """A section's rows, and after a key typed as a (possibly optional) section, that section's keys
    (a section that holds one of the sections above it, as data.extra.source does, is not unrolled)."""
    hints, meaning, rows = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        rows.append([_code(prefix + f.name), _type(hints[f.name]), _default(f), meaning[f.name]])
        inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if inner and inner[0] not in (cls, *above):
            rows += _fields(inner[0], f"{prefix}{f.name}.", (*above, cls))
    return rows


def _first_paragraph(obj) -> str:
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())


class Directive(SphinxDirective):
    has_content = False

    def run(self):
        return self.parse_text_to_nodes(self.text(), allow_section_headings=True)

    def text(self) -> str:
        raise NotImplementedError


class Cli(Directive):
    def text(self) -> str:
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in commands._choices_actions}
        parts = []
        for name, sub in commands.choices.items():
            rows = []
            for action in sub._actions:
                if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                    continue
                flag = ", ".join(action.option_strings) or action.dest
                default = "" if action.default in (None, False, argparse.SUPPRESS) else _code(str(action.default))
                choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
                rows.append([_code(flag), (action.help or "") + choices, default])
            parts += [f"## {name}", "", f"{helps.get(name, '')}.", "", _literal(" ".join(sub.format_usage().split()))]
            parts.append(_table(["argument", "what", "default"], rows))
            if sub.epilog:
                parts.append(_literal(sub.epilog))
        return "\n".join(parts)


class ConfigKeys(Directive):
    """Every section of `Config`, each from the dataclass it is typed as."""

    def text(self) -> str:
        hints, meaning = typing.get_type_hints(Config), field_comments(Config)
        top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
        rows = [[_code(f.name), _type(hints[f.name]), _default(f), meaning[f.name]] for f in top]
        parts = ["## Top-level keys", "", _table(KEYS, rows)]
        for f in dataclasses.fields(Config):
            section = typing.get_args(hints[f.name])[1] if f.name == "teachers" else hints[f.name]
            if not dataclasses.is_dataclass(section):
                continue
            prefix = "teachers.<role>." if f.name == "teachers" else f"{f.name}."
            doc = _first_paragraph(section)
            doc = "" if doc.startswith(section.__name__ + "(") else doc  # a dataclass's generated signature
            where = _code(f"{section.__module__}.{section.__qualname__}")
            parts += [
                f"## {_code(prefix.rstrip('.'))}",
                "",
                f"{doc} Defined by {where}.",
                "",
                _table(KEYS, _fields(section, prefix)),
            ]
        return "\n".join(parts)


class MethodOptions(Directive):
    def text(self) -> str:
        parts = []
        for name in METHODS.names():
            method = METHODS.get(name)
            rows = [row for row in _fields(method.Options, "method.") if row[0] != "`method.name`"]
            teachers = ", ".join(method.teachers) or "none"
            parts += [f"### {_code(name)}", "", f"{method.summary}; teachers: {teachers}.", ""]
            parts.append(_table(KEYS, rows) if rows else "No options of its own.\n")
        return "\n".join(parts)


class GridKeys(Directive):
    def text(self) -> str:
        return "\n".join(
            [
                "### Grid keys",
                "",
                _table(KEYS, _fields(Grid, "")),
                "### The `slurm:` section",
                "",
                _table(KEYS, _fields(SlurmSpec, "slurm.")),
            ]
        )


class Methods(Directive):
    """Every registered method: what it is, its paper, its teachers, its equations and its differences
    from the official code (the docstring of its module, where they are written next to the code)."""

    def text(self) -> str:
        parts, seen = [], {}
        for name in METHODS.names():
            method = METHODS.get(name)
            module = inspect.getmodule(method).__name__
            parts += [f"### {_code(name)}", "", f"**{method.summary}**", "", f"Paper: {method.paper}", ""]
            teachers = ", ".join(method.teachers) or "none"
            parts += [f"Teachers: {teachers}; best checkpoint by {_code(method.selection_metric)} on validation.", ""]
            if module in seen:
                parts += [f"Its equations and options: with {_code(seen[module])} above.", ""]
                continue
            seen[module] = name
            parts.append(_literal(inspect.getdoc(importlib.import_module(module)) or ""))
        return "\n".join(parts)


class Docstring(Directive):
    """A module's docstring, verbatim (`rd-docstring robustdistill.evaluation.report`)."""

    required_arguments = 1

    def text(self) -> str:
        return _literal(inspect.getdoc(importlib.import_module(self.arguments[0])) or "")


class Registries(Directive):
    def text(self) -> str:
        methods = [
            [_code(n), ", ".join(METHODS.get(n).teachers) or "-", METHODS.get(n).summary] for n in METHODS.names()
        ]
        sections = [
            ("Models", ["name", "what"], [[_code(n), _first_paragraph(MODELS.get(n))] for n in MODELS.names()]),
            ("Methods", ["name", "teachers", "what"], methods),
            (
                "Attacks",
                ["name", "kind", "what"],
                [[_code(n), ATTACKS.get(n).kind, ATTACKS.get(n).help] for n in ATTACKS.names()],
            ),
            (
                "Sanity checks",
                ["id", "name", "what must hold"],
                [[str(c.id), _code(c.name), c.asserts] for c in registered()],
            ),
            ("Datasets", ["name", "what"], [[_code(n), _first_paragraph(DATASETS.get(n))] for n in DATASETS.names()]),
            ("Digits recipes", ["name", "what"], [[_code(n), summary(n)] for n in recipe_names()]),
            ("Shipped grids", ["name", "what"], [[_code(n), summary(n, "grids")] for n in grid_names()]),
        ]
        parts = []
        for title, header, rows in sections:
            parts += [f"## {title}", "", _table(header, rows)]
        return "\n".join(parts)


def setup(app):
    for name, directive in {
        "rd-cli": Cli,
        "rd-config": ConfigKeys,
        "rd-method-options": MethodOptions,
        "rd-grid": GridKeys,
        "rd-methods": Methods,
        "rd-docstring": Docstring,
        "rd-registries": Registries,
    }.items():
        app.add_directive(name, directive)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
