"""Puts tests/, tests/pyro and tests/numpyro on sys.path so test files import the shared helpers
as top-level modules: ``import specs, stats``, ``from pyro_oracle import ...``,
``from numpyro_oracle import ...``. The tests directories are NOT packages (no __init__.py):
keep it that way, or ``tests/pyro`` would shadow the ``pyro`` package."""
import os
import sys

# The test models are tiny: XLA compile time dominates the NumPyro tests, and the
# backend optimisation level does not change the numbers they check (~10% faster).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

_here = os.path.dirname(os.path.abspath(__file__))
for _d in (os.path.join(_here, "numpyro"), os.path.join(_here, "pyro"), _here):
    if _d not in sys.path:
        sys.path.insert(0, _d)
