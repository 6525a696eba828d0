"""The two packages mirror each other: same public names, same estimator arguments."""

import inspect

import pytest

import numpyro_binary_grads
import pyro_binary_grads


#: Pyro's compiled classes (Pyro's JitTrace_ELBO naming); NumPyro steps are
#: compiled with jax.jit, so it has none
PYRO_ONLY = {"JitARM_ELBO", "JitDisARM_ELBO", "JitRLOO_ELBO", "JitVIMCO", "JitLocalDisARM_IWAE",
             "JitREBAR_ELBO"}


def test_same_public_names():
    assert set(pyro_binary_grads.__all__) - PYRO_ONLY == set(numpyro_binary_grads.__all__)


def test_same_estimator_arguments():
    """Estimator arguments (keyword-only) have the same names and defaults;
    framework arguments follow each framework's ELBO base class."""
    for name in sorted(set(pyro_binary_grads.__all__) - PYRO_ONLY):
        p, n = getattr(pyro_binary_grads, name), getattr(numpyro_binary_grads, name)
        if not (isinstance(p, type) and name.endswith(("ELBO", "VIMCO", "IWAE"))):
            continue

        def keyword_only(cls):
            params = inspect.signature(cls.__init__).parameters.values()
            return {q.name: q.default for q in params if q.kind is q.KEYWORD_ONLY}

        assert keyword_only(p) == keyword_only(n), name
        assert "num_particles" in inspect.signature(n.__init__).parameters, name


@pytest.mark.parametrize("package", ["pyro_binary_grads", "numpyro_binary_grads"])
def test_every_public_class_has_a_docstring_with_citation(package):
    """A class docstring built as ``\"\"\"...\"\"\" + X`` is an expression, not a
    docstring (``__doc__`` is None and the docs show nothing): assign it."""
    import importlib
    import inspect

    mod = importlib.import_module(package)
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not inspect.isclass(obj):
            continue
        assert obj.__doc__, f"{package}.{name} has no docstring"
        if name.endswith("_ELBO") or name in ("VIMCO", "LocalDisARM_IWAE", "JitVIMCO",
                                              "JitLocalDisARM_IWAE"):
            assert "[1]" in obj.__doc__, f"{package}.{name} cites no paper"
