"""
Pyro's own ``tests/infer/test_valid_models.py`` run against this package
(not part of the suite; a measurement). Pyro's ELBO names are rebound to
ours (Trace_ELBO -> DisARM_ELBO, TraceGraph_ELBO -> ARM_ELBO, TraceEnum_ELBO ->
RLOO_ELBO, TraceTMC_ELBO -> VIMCO, TraceMeanField_ELBO -> DisARM_ELBO), with
Pyro's warnings-as-errors filter (our two informational warnings ignored)::

    python tests/pyro/pyro_valid_models_harness.py PATH/TO/pyro/tests/infer/test_valid_models.py OUT_DIR
    cd OUT_DIR && COLUMNS=2000 python -m pytest -q -p no:cacheprovider test_valid_ours.py \\
        -k "not EnergyDistance and not TraceTailAdaptive" --tb=no -rf > report.txt
    python tests/pyro/pyro_valid_models_harness.py --classify OUT_DIR/report.txt

``--classify`` groups the failures of that report by cause. Expected by
design (the issue's "clear error for what is out of scope", or Pyro's
enumeration-specific assertions that do not apply once TraceEnum_ELBO and
TraceTMC_ELBO are rebound to sampling estimators): an enumerate flag, a
model site enumerated (absent from the guide), a non-reparameterizable
continuous guide site, enumerated shapes asserted by the test, Pyro's
enumeration warnings. Everything else is listed as "to fix".
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


EXPECTED = [
    ("enumerate flag refused", "is marked for enumeration"),
    ("model site enumerated (not in the guide) refused", "is latent but not in the guide"),
    ("non-reparameterizable continuous guide site refused", "is neither reparameterizable"),
    ("enumerated shape asserted by the test", "assert torch.Size("),
]
#: tests whose assertion is about TraceEnum_ELBO's / TraceMeanField_ELBO's
#: warnings (strict_enumeration_warning, mean-field checks)
WARNING_TESTS = ("strict_enumeration", "enum_discrete", "empty_guide_ok", "empty_model_empty",
                 "mean_field_warn", "enum_in_model", "markov_history", "enum_sequential",
                 "no_plate_enum_discrete", "nested_plate_plate_dim_error_1[RLOO",
                 "nested_plate_plate_dim_error_1[VIMCO", "nested_plate_plate_dim_error_3[RLOO")


def classify(report):
    """``{cause: [test ids]}`` of the FAILED lines of a pytest ``-rf`` report."""
    groups = {}
    for line in Path(report).read_text().splitlines():
        if not line.startswith("FAILED "):
            continue
        test, _, why = line[len("FAILED "):].partition(" - ")
        cause = next((c for c, key in EXPECTED if key in why), None)
        if cause is None and ("No warnings were raised" in why or "Regex pattern" in why) \
                and any(k in test for k in WARNING_TESTS):
            cause = "enumeration-specific warning or error expected by the test"
        groups.setdefault(cause or "to fix: " + why[:80], []).append(test)
    return groups


def main(src, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(src).read_text().replace("from tests.common import assert_close", HEADER)
    (out / "test_valid_ours.py").write_text(text)
    (out / "pytest.ini").write_text(INI)


if __name__ == "__main__":
    if sys.argv[1] == "--classify":
        for cause, tests in sorted(classify(sys.argv[2]).items(), key=lambda kv: -len(kv[1])):
            print(f"{len(tests):4d}  {cause}")
            if cause.startswith("to fix"):
                print("\n".join("        " + t for t in tests))
    else:
        main(*sys.argv[1:3])
