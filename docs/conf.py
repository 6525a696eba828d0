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


# The docstrings cite the estimator notes of the development tree
# ("``ESTIMATORS.md`` section 5"); in the built docs they point to the
# notation page, which has the notation and the section -> page table.
_NOTES = re.compile(r"``ESTIMATORS\.md``|(?<![`\w])ESTIMATORS\.md")


def _cite_notes(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        if "ESTIMATORS.md" in line:
            lines[i] = _NOTES.sub(":doc:`the estimator notes </notation>`", line)


def setup(app):
    app.connect("autodoc-process-docstring", _cite_notes)
