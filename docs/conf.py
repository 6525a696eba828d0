"""Sphinx configuration of the binary-grads documentation.

Build: ``sphinx-build -W -b html docs docs/_build`` (warnings are errors).
Both frameworks are installed for the build: nothing is mocked.
"""
import os
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
