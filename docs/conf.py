"""Sphinx configuration of robustdistill's documentation site.

    pip install -e ".[test]"                                          # Sphinx, furo and MyST come with it
    sphinx-build -W --keep-going -b html docs docs/_build/html        # strict: a warning fails the build

The reference pages are generated from the code at build time (`_ext/reference.py`: the CLI from its
argparse parsers, every config key from the dataclasses, the registries), the API from docstrings
(autodoc); nothing there is typed by hand.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "robustdistill"
author = "the robustdistill developers"
copyright = "2026, the robustdistill developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "reference"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "robustdistill"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
