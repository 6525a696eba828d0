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

# The whole suite runs JAX with float64 enabled (``jax_enable_x64``), set here, before any
# test module is imported. The flag is process-global and several modules need it (the
# enumeration oracles, the edge battery); set only by their imports, a test's precision
# depended on which modules the worker had collected, so a test could pass alone and fail
# in the suite (CI once did, on a float32-rounding test). Tests of the float32 regime
# that users run by default build float32 arrays explicitly or run under
# ``with jax.enable_x64(False):``. Examples run as subprocesses keep JAX's default.
try:
    import jax  # noqa: E402
except ImportError:  # a Pyro-only environment
    jax = None
else:
    jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _global_precision_unchanged(request):
    """Fails a test that leaves JAX's ``jax_enable_x64`` or torch's default dtype changed:
    both are process-global, and a test that flips them makes later tests in the same
    worker compute in another precision (CI once failed 33 float64 tests that way)."""
    jax = sys.modules.get("jax")
    torch = sys.modules.get("torch")
    before = (jax.config.read("jax_enable_x64") if jax else None,
              torch.get_default_dtype() if torch else None)
    yield
    after = (jax.config.read("jax_enable_x64") if jax else None,
             torch.get_default_dtype() if torch else None)
    if jax is None:
        after = (None, after[1])
    if torch is None:
        after = (after[0], None)
    assert after == before, (f"{request.node.nodeid} left (jax_enable_x64, torch default "
                             f"dtype) = {after}, was {before}: restore it in a finally block")
