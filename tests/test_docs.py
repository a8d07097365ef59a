"""The documentation: the site builds in strict mode (a broken link, a missing page or any other
warning fails it), every config key has a meaning for the generated reference, the README stays the
front door (short, its links alive), and nothing points to files outside the repository."""

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from robustdistill.core.schema import field_comments
from robustdistill.methods import METHODS
from robustdistill.studies.grid import Grid, SlurmSpec
from robustdistill.training.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _config_classes():
    hints = typing.get_type_hints(Config)
    sections = [typing.get_args(hints["teachers"])[1]]
    sections += [hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    inner = [_section(tp) for cls in sections for tp in typing.get_type_hints(cls).values() if _section(tp)]
    return [Config, *sections, *inner, *(METHODS.get(n).Options for n in METHODS.names()), Grid, SlurmSpec]


def _section(tp):
    """The dataclass a field is typed as (Optional[...] too), or None."""
    found = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
    return found[0] if found else None


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__qualname__)
def test_every_config_key_says_what_it_means(cls):
    """The reference's meaning column is the comment after each field: none may be missing."""
    missing = [
        key for key, meaning in field_comments(cls).items() if not meaning and not (key == "name" and cls is not Config)
    ]
    assert not missing, f"{cls.__module__}.{cls.__qualname__}: give these a comment saying what they mean: {missing}"


def test_the_readme_is_the_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12_500, "the README is the front door: what, two commands, the demo, links"
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"README.md links to {link}, which is not there"


def test_nothing_points_outside_the_repository():
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("src/**/*.py"), *ROOT.glob("src/**/*.yaml")]
    for path in files:
        text = path.read_text()
        assert not re.search(r"\bspec/(methods|evaluation)\.md|shared/(spec|reference)", text), path


@pytest.mark.slow
def test_the_documentation_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(ROOT / "docs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {"tutorial.html", "reference/cli.html", "reference/config.html", "explanation/methods.html"} <= pages
    config = (tmp_path / "reference" / "config.html").read_text()
    assert "train.epochs" in config and "eval.attacks" in config and "method.rate" in config
    assert "absld" in (tmp_path / "explanation" / "methods.html").read_text()
