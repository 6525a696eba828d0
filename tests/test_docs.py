"""The documentation builds with warnings as errors (docs/, Sphinx)."""

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "index.html").exists()


def test_sources_compile_without_warnings():
    """No invalid escape sequence in any docstring (``\\tfrac`` in a non-raw
    string is a tab, ``\\l`` a SyntaxWarning): every tracked ``.py`` compiles with
    warnings as errors."""
    import warnings

    root = DOCS.parent
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split()
    assert len(files) > 50
    bad = []
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile((root / f).read_text(), f, "exec")
            except (SyntaxError, SyntaxWarning, DeprecationWarning) as e:
                bad.append(f"{f}: {e}")
    assert not bad, "\n".join(bad)
