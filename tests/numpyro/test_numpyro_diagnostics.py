"""
compare_estimators (numpyro_binary_grads.diagnostics): the variance it
reports equals a direct computation with the same keys; exact=True gives
near-zero bias for DisARM and clearly non-zero bias for ST_ELBO (and for
DisARM with its loss scaled by 1.3, built here); exact_elbo against the test oracle; refusals; the table;
the CLI and the NumPyro tutorial script.
"""
import json
import os
import runpy
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import TraceGraph_ELBO  # noqa: E402

from numpyro_binary_grads import DisARM_ELBO, OneHotCategorical, RLOO_ELBO, ST_ELBO  # noqa: E402
from numpyro_binary_grads.compare import main  # noqa: E402
from numpyro_binary_grads.diagnostics import compare_estimators, exact_elbo  # noqa: E402
from numpyro_oracle import exact_elbo as oracle_elbo  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
KEY = jax.random.PRNGKey(0)
X = jnp.array([1.0, -0.5])
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tiny models


def model(x):
    w = numpyro.param("w", jnp.array([0.7, -1.2]))
    with numpyro.plate("n", 2):
        z1 = numpyro.sample("z1", dist.Bernoulli(logits=0.3))
        z2 = numpyro.sample("z2", dist.Bernoulli(logits=1.5 * z1 - 0.5))
        numpyro.sample("x", dist.Normal(w[0] * z1 + w[1] * z2, 1.0), obs=x)


def guide(x):
    a = numpyro.param("a", jnp.array([0.5, -1.0]))
    c = numpyro.param("c", jnp.array(-0.4))
    with numpyro.plate("n", 2):
        z1 = numpyro.sample("z1", dist.Bernoulli(logits=a))
        numpyro.sample("z2", dist.Bernoulli(logits=c + 1.2 * z1))


PARAMS = {"a": jnp.array([0.5, -1.0]), "c": jnp.array(-0.4), "w": jnp.array([0.7, -1.2])}


class ScaledDisARM(DisARM_ELBO):
    """A deliberately biased estimator: DisARM's loss (and gradient) times 1.3."""

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        return 1.3 * super().loss(rng_key, param_map, model, guide, *args, **kwargs)


def test_variance_matches_direct_computation():
    disarm, tg = DisARM_ELBO(), TraceGraph_ELBO()
    table = compare_estimators(KEY, model, guide, X, estimators=[disarm, tg], num_samples=100,
                               compiler_options=FAST)
    keys = jax.random.split(jax.random.split(KEY)[1], 100)
    for row, elbo in [(table["DisARM_ELBO"], disarm), (table["TraceGraph_ELBO"], tg)]:
        grad = jax.jit(jax.grad(lambda p, k: elbo.loss(k, p, model, guide, X)),
                       compiler_options=FAST)
        draws = [grad(PARAMS, k) for k in keys]  # all params unconstrained (real)
        total = 0.0
        for name in PARAMS:
            g = np.stack([np.asarray(d[name]) for d in draws])
            np.testing.assert_allclose(row.mean[name], g.mean(0), rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(row.var[name], g.var(0, ddof=1), rtol=1e-10, atol=1e-13)
            assert row.group_variance[name] == pytest.approx(g.var(0, ddof=1).sum(), rel=1e-10)
            total += g.var(0, ddof=1).sum()
        assert row.total_variance == pytest.approx(total, rel=1e-10)
        assert row.executions >= 2 and row.ms_per_step > 0
    assert table["DisARM_ELBO"].evaluations == 3  # 1 + T, T = 2 discrete sites
    assert table["TraceGraph_ELBO"].evaluations == 1
    print(f"\n{table}")


def test_params_argument_and_constraints():
    def guide_pos(x):
        s = numpyro.param("s", jnp.array(1.0), constraint=dist.constraints.positive)
        with numpyro.plate("n", 2):
            numpyro.sample("z1", dist.Bernoulli(logits=s - 1.0))
            numpyro.sample("z2", dist.Bernoulli(logits=s))

    def model_pos(x):
        with numpyro.plate("n", 2):
            numpyro.sample("z1", dist.Bernoulli(logits=0.0))
            z2 = numpyro.sample("z2", dist.Bernoulli(logits=0.0))
            numpyro.sample("x", dist.Normal(z2, 1.0), obs=x)

    table = compare_estimators(KEY, model_pos, guide_pos, X, estimators=[DisARM_ELBO()],
                               num_samples=2000, exact=True, params={"s": jnp.array(2.0)},
                               compiler_options=FAST)
    row = table["DisARM_ELBO"]
    # gradient w.r.t. the unconstrained u = log s at s = 2 (as SVI differentiates it)
    u_grad = jax.grad(lambda u: -exact_elbo({"s": jnp.exp(u)}, model_pos, guide_pos, X))(
        jnp.log(2.0))
    assert row.exact["s"] == pytest.approx(float(u_grad), rel=1e-10)
    assert row.max_abs_z < 5


def test_exact_elbo_matches_oracle():
    ours = exact_elbo(PARAMS, model, guide, X)
    assert float(ours) == pytest.approx(float(oracle_elbo(PARAMS, model, guide, X)), rel=1e-12)


def test_exact_bias_disarm_near_zero_scaled_disarm_clearly_nonzero():
    table = compare_estimators(KEY, model, guide, X, num_samples=2000, exact=True,
                               compiler_options=FAST,
                               estimators={"DisARM": DisARM_ELBO(),
                                           "DisARM x 1.3 (biased)": ScaledDisARM()})
    print(f"\n{table}")
    good, bad = table["DisARM"], table["DisARM x 1.3 (biased)"]
    assert good.max_abs_z < 5 and good.relative_bias < 0.05
    assert bad.max_abs_z > 10 and bad.relative_bias > 0.2


def test_exact_bias_straight_through_clearly_nonzero():
    """The Pyro test's model: one 3-class OneHotCategorical site in a plate of 2."""
    x = jnp.array([0.8, -1.5])

    def onehot_model(x):
        mu = numpyro.param("mu", jnp.array([-1.0, 0.5, 2.0]))
        with numpyro.plate("n", 2):
            z = numpyro.sample("z", OneHotCategorical(logits=jnp.zeros(3)))
            numpyro.sample("x", dist.Normal(z @ mu, 0.7), obs=x)

    def onehot_guide(x):
        a = numpyro.param("a", jnp.array([[0.3, -0.6, 0.9], [1.0, 0.0, -1.0]]))
        with numpyro.plate("n", 2):
            numpyro.sample("z", OneHotCategorical(logits=a))

    table = compare_estimators(KEY, onehot_model, onehot_guide, x, num_samples=1000,
                               exact=True, compiler_options=FAST,
                               estimators={"ST": ST_ELBO(), "RLOO": RLOO_ELBO(num_samples=2)})
    print(f"\n{table}")
    st, rloo = table["ST"], table["RLOO"]
    assert st.max_abs_z > 10 and st.relative_bias > 0.2, st.to_dict()
    assert rloo.max_abs_z < 5  # the unbiased control on the same model
    assert np.abs(st.z["a"]).max() > 10  # the bias sits in the guide logits


def test_exact_refuses_continuous_latents():
    def model_c():
        numpyro.sample("y", dist.Normal(0.0, 1.0))

    def guide_c():
        numpyro.sample("y", dist.Normal(numpyro.param("loc", 0.0), 1.0))

    with pytest.raises(ValueError, match="continuous latent sites cannot be enumerated"):
        compare_estimators(KEY, model_c, guide_c, estimators=[TraceGraph_ELBO()],
                           num_samples=2, exact=True)


def test_table_prints_aligned_and_converts_to_dict():
    table = compare_estimators(KEY, model, guide, X, num_samples=5, exact=True,
                               compiler_options=FAST,
                               estimators={"disarm": DisARM_ELBO(), "tg": TraceGraph_ELBO()})
    lines = str(table).splitlines()
    assert lines[0].split()[:4] == ["estimator", "exec/step", "evals/step", "ms/step"]
    assert len({len(line) for line in lines[:4]}) == 1
    d = json.loads(json.dumps(table.to_dict()))
    assert set(d) == {"disarm", "tg"} and set(d["tg"]["params"]) == {"a", "c", "w"}
    assert {"mean", "var", "variance", "exact", "bias", "z"} <= set(d["tg"]["params"]["a"])


def test_command_line_entry_point(capsys):
    table = main(["--num-samples", "3", "--exact", "--fast-compile"])
    out = capsys.readouterr().out
    assert "DisARM_ELBO" in out and "TraceGraph_ELBO" in out and "max|z|" in out
    assert len(table) == 3


def test_tutorial_script_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["numpyro_sbn.py", "--num-steps", "3"])
    runpy.run_path(os.path.join(DOCS, "tutorials", "numpyro_sbn.py"), run_name="__main__")
    assert "step     2" in capsys.readouterr().out
