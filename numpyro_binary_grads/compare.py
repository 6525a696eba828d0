"""
Compare gradient estimators on a model: :func:`compare_estimators` (defined
in :mod:`numpyro_binary_grads.diagnostics`) and a command-line demo on a
small two-layer sigmoid belief net::

    python -m numpyro_binary_grads.compare --num-samples 1000 --exact
"""

import argparse

import numpy as np
import jax
import jax.numpy as jnp

import numpyro
import numpyro.distributions as dist
from numpyro.infer import TraceGraph_ELBO

from .diagnostics import compare_estimators, exact_elbo
from .elbo import ARM_ELBO, DisARM_ELBO

__all__ = ["compare_estimators", "exact_elbo", "example_sbn", "main"]


def example_sbn(num_data=2, num_pixels=6, hidden=(2, 3), seed=0):
    """
    A small two-layer sigmoid belief net :math:`z_2 \\to z_1 \\to x` with a
    bottom-up guide :math:`x \\to z_1 \\to z_2`, on random binary data; small
    enough for ``exact=True`` (:math:`2^{N (H_1 + H_2)}` configurations).
    Params are initialised with random logits.

    :returns: ``(model, guide, data)``.
    """
    rng = np.random.default_rng(seed)
    data = jnp.asarray((rng.random((num_data, num_pixels)) < 0.5) * 1.0)
    h2, h1 = hidden

    def init(*shape):
        return jnp.asarray(0.5 * rng.standard_normal(shape))

    inits = {k: init(*s) for k, s in [("prior", (h2,)), ("w2", (h2, h1)), ("b2", (h1,)),
                                      ("w1", (h1, num_pixels)), ("b1", (num_pixels,)),
                                      ("v1", (num_pixels, h1)), ("c1", (h1,)),
                                      ("v2", (h1, h2)), ("c2", (h2,))]}

    def param(name):
        return numpyro.param(name, inits[name])

    def model(x):
        prior, w2, b2, w1, b1 = (param(k) for k in ("prior", "w2", "b2", "w1", "b1"))
        with numpyro.plate("data", x.shape[0]):
            z2 = numpyro.sample("z2", dist.Bernoulli(logits=prior).to_event(1))
            z1 = numpyro.sample("z1", dist.Bernoulli(logits=z2 @ w2 + b2).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=z1 @ w1 + b1).to_event(1), obs=x)

    def guide(x):
        v1, c1, v2, c2 = (param(k) for k in ("v1", "c1", "v2", "c2"))
        with numpyro.plate("data", x.shape[0]):
            z1 = numpyro.sample("z1", dist.Bernoulli(logits=x @ v1 + c1).to_event(1))
            numpyro.sample("z2", dist.Bernoulli(logits=z1 @ v2 + c2).to_event(1))

    return model, guide, data


def main(argv=None):
    """Run :func:`compare_estimators` on :func:`example_sbn` and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m numpyro_binary_grads.compare",
        description="Gradient mean / variance / cost (and, with --exact, bias) of several "
                    "estimators on a small two-layer sigmoid belief net.")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help="gradient draws per estimator (default 1000)")
    parser.add_argument("--exact", action="store_true",
                        help="also report the bias against the exact gradient (enumeration)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (stderr) and no per-estimator lines")
    parser.add_argument("--fast-compile", action="store_true",
                        help="compile with XLA backend optimisation off (faster start)")
    args = parser.parse_args(argv)
    options = {"xla_backend_optimization_level": 0} if args.fast_compile else None
    model, guide, data = example_sbn(seed=args.seed)
    estimators = [DisARM_ELBO(), ARM_ELBO(), TraceGraph_ELBO()]
    table = compare_estimators(jax.random.PRNGKey(args.seed), model, guide, data,
                               estimators=estimators, num_samples=args.num_samples,
                               exact=args.exact,
                               progress=not args.no_progress,
                               on_row=None if args.no_progress else _print_row, compiler_options=options)
    print(table)
    return table


def _print_row(row):
    """One line per estimator as soon as it is done (the table follows at the end)."""
    line = (f"{row.name}: {row.ms_per_step:.2f} ms/step, total var {row.total_variance:.4g}, "
            f"SNR {row.snr:.3g}")
    if row.exact is not None:
        line += f", rel bias {row.relative_bias:.3g}, max|z| {row.max_abs_z:.3g}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
