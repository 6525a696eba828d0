"""Sphinx configuration of the binary-grads documentation.

Build: ``sphinx-build -W -b html docs docs/_build`` (warnings are errors).
Both frameworks are installed for the build: nothing is mocked.
"""
import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "binary-grads"
author = "binary-grads contributors"
copyright = "2026, binary-grads contributors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
exclude_patterns = ["_build", "tutorials/*.py"]
html_theme = "alabaster"
html_static_path = []


_FIELD = re.compile(r"^:(param|type|returns?|rtype|raises?|ivar|var|cvar|keyword|kwarg)[ :]")


def _blank_line_after_field_lists(app, what, name, obj, options, lines):
    """Some docstrings continue with plain text right after a field list
    (``:param K: ...`` then ``Other parameters as ...``), which docutils warns
    about; insert the blank line it needs (only that: the text is unchanged)."""
    i = 0
    in_field = False
    while i < len(lines):
        line = lines[i]
        if _FIELD.match(line):
            in_field = True
        elif in_field and line and not line[0].isspace():
            lines.insert(i, "")
            in_field = False
            i += 1
        elif not line:
            in_field = False
        i += 1


def setup(app):
    app.connect("autodoc-process-docstring", _blank_line_after_field_lists)
