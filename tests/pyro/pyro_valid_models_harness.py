"""
Pyro's own ``tests/infer/test_valid_models.py`` run against this package
(not part of the suite; a measurement). Pyro's ELBO names are rebound to
ours (Trace_ELBO -> DisARM_ELBO, TraceGraph_ELBO -> ARM_ELBO, TraceEnum_ELBO ->
RLOO_ELBO, TraceTMC_ELBO -> VIMCO, TraceMeanField_ELBO -> DisARM_ELBO), with
Pyro's warnings-as-errors filter (our two informational warnings ignored)::

    python tests/pyro/pyro_valid_models_harness.py PATH/TO/pyro/tests/infer/test_valid_models.py OUT_DIR
    cd OUT_DIR && python -m pytest -q -p no:cacheprovider test_valid_ours.py \\
        -k "not EnergyDistance and not TraceTailAdaptive"
"""

import sys
from pathlib import Path

HEADER = '''from torch.testing import assert_close as _ac


def assert_close(a, b, atol=1e-6, rtol=0):
    _ac(torch.as_tensor(float(a)), torch.as_tensor(float(b)), atol=atol, rtol=rtol)


from pyro_binary_grads import ARM_ELBO, DisARM_ELBO, RLOO_ELBO, VIMCO
Trace_ELBO = DisARM_ELBO
TraceGraph_ELBO = ARM_ELBO
TraceEnum_ELBO = RLOO_ELBO
TraceTMC_ELBO = VIMCO
TraceMeanField_ELBO = DisARM_ELBO'''

INI = """[pytest]
filterwarnings = error
    ignore:numpy.ufunc size changed:RuntimeWarning
    ignore:numpy.dtype size changed:RuntimeWarning
    ignore::DeprecationWarning
    ignore:.*does not broadcast over the evaluation dim:UserWarning
    ignore:.*is summed over:RuntimeWarning
markers =
    stage
    init
    benchmark
"""


def main(src, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(src).read_text().replace("from tests.common import assert_close", HEADER)
    (out / "test_valid_ours.py").write_text(text)
    (out / "pytest.ini").write_text(INI)


if __name__ == "__main__":
    main(*sys.argv[1:3])
