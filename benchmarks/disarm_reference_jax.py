"""
Reference for the DisARM-paper rows of ``RESULTS.md``: a hand-written jitted
JAX DisARM step (no NumPyro, no plugin) of the setup of
``examples/sbn.py --preset disarm --model linear1``, trained for the paper's
budget and evaluated with a hand-written 100-sample bound.

Setup (Dong, Mnih & Tucker 2020, section 6 / App.; ../shared/REFERENCE_RESULTS.md):
linear one-layer SBN with 200 latents, ``b ~ Bern(sigma(c_0))``,
``x ~ Bern(sigma(b W + c))``, ``q(b | x) = Bern(sigma((x - xbar) V + d))``,
dynamically binarized MNIST (first 50,000 training images), batch 50, Adam lr 1e-4
for the networks, SGD lr 1e-2 for the prior logits, gradients of the per-example
ELBO (the minibatch loss divided by the data-set size). Same initial parameters,
data order and binarization draws as ``examples/sbn.py`` with the same ``--seed``.

The encoder gradient is DisARM (Dong et al. 2020, eq. 5) on the antithetic pair
``b = 1[u < sigma(a)]``, ``b~ = 1[1 - u < sigma(a)]``, per example ``n`` and unit ``i``::

    g_ni = 1/2 (f_n(b) - f_n(b~)) (-1)^{b~_ni} 1[b_ni != b~_ni] sigma(|a_ni|),

``f_n(b) = log p(x_n, b_n) - log q(b_n | x_n)``; decoder and prior get the
pathwise gradient of the pair's mean ``f``. The JSON line has the keys of
``examples/sbn.py``'s so ``benchmarks/reproduce.py`` tabulates both alike.

    python benchmarks/disarm_reference_jax.py --num-steps 1000000
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import common  # noqa: E402

common.limit_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.lax import stop_gradient  # noqa: E402
import optax  # noqa: E402

from data import DATA_DIR, load_mnist, output_bias_init  # noqa: E402


def init_params(train, rng, hidden=200):
    """As ``examples/sbn.py``'s ``init_params`` for linear1 (same rng order)."""
    P = {"prior_logits": np.zeros(hidden, np.float32)}
    common.mlp_init(rng, (hidden, train.dim), "dec", P, output_bias_init(train))
    common.mlp_init(rng, (train.dim, hidden), "enc", P)
    return {k: jnp.asarray(v) for k, v in P.items()}


def log_bern(v, logits):
    """sum_i log Bern(v_i | logits_i) = v a - softplus(a), over the last dim."""
    return jnp.sum(v * logits - jax.nn.softplus(logits), -1)


def log_joint(P, x, b, a):
    return (log_bern(b, P["prior_logits"]) + log_bern(x, b @ P["dec0_W"] + P["dec0_b"])
            - log_bern(b, a))


def encoder_logits(P, x, mean):
    return (x - mean) @ P["enc0_W"] + P["enc0_b"]


def surrogate(P, key, x, mean):
    """-(per-example ELBO) surrogate of one DisARM pair, averaged over the batch."""
    a = encoder_logits(P, x, mean)
    u = jax.random.uniform(key, a.shape, a.dtype)
    b = (u < jax.nn.sigmoid(a)).astype(a.dtype)
    bt = (1.0 - u < jax.nn.sigmoid(a)).astype(a.dtype)
    a_sg = stop_gradient(a)
    f, ft = log_joint(P, x, b, a_sg), log_joint(P, x, bt, a_sg)
    g = 0.5 * (f - ft)[:, None] * (1.0 - 2.0 * bt) * (b != bt) * jax.nn.sigmoid(jnp.abs(a_sg))
    value = 0.5 * (f + ft)
    score = jnp.sum(a * stop_gradient(g), -1)
    return -jnp.mean(value + score - stop_gradient(score)), -jnp.mean(value)


def iwae(P, key, x, mean, K=100, chunk=10, joint=None):
    """Per-example K-sample bound log 1/K sum_k p(x, b_k) / q(b_k | x)
    (``joint(P, x, b, a)``: ``log p(x, b) - log q(b | x)``, default :func:`log_joint`)."""
    joint = log_joint if joint is None else joint
    a = encoder_logits(P, x, mean)

    def draws(k):
        b = (jax.random.uniform(k, (chunk,) + a.shape) < jax.nn.sigmoid(a)).astype(a.dtype)
        return jax.vmap(lambda bb: joint(P, x, bb, a))(b)

    keys = jax.random.split(key, K // chunk)
    lw = jnp.concatenate([draws(k) for k in keys], 0)
    return jax.nn.logsumexp(lw, 0) - math.log(K)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-steps", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA_DIR / "mnist.npz")
    p.add_argument("--eval-every", type=int, default=50_000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "disarm_reference")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--backend", default="jax", help="ignored (for reproduce.py)")
    p.add_argument("--overwrite", action="store_true", help="ignored (for reproduce.py)")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS,
                   help="intra-op threads (read before jax is imported; 0: XLA's choice)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    train = load_mnist(args.data, "dynamic", "train")
    test = load_mnist(args.data, "dynamic", "test")
    rng = np.random.default_rng(args.seed)
    P = init_params(train, rng)
    train.binarized(np.arange(50), rng)  # examples/sbn.py draws an example batch here
    mean = jnp.asarray(train.mean().astype(np.float32))
    tx = optax.multi_transform(
        {"main": optax.adam(1e-4), "prior": optax.sgd(1e-2)},
        lambda params: {k: "prior" if k == "prior_logits" else "main" for k in params})
    state = (P, tx.init(P), jax.random.PRNGKey(args.seed))

    @jax.jit
    def update(state, x):
        params, opt_state, key = state
        key, sub = jax.random.split(key)
        (_, loss), grads = jax.value_and_grad(surrogate, has_aux=True)(params, sub, x, mean)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    bound = jax.jit(lambda params, key, x: jnp.mean(iwae(params, key, x, mean)))

    def evaluate(params, x, key):
        total = sum(float(bound(params, jax.random.fold_in(key, s), x[s:s + 500]))
                    * len(x[s:s + 500]) for s in range(0, len(x), 500))
        return total / len(x)

    x_eval = jnp.asarray(test.fixed_binarization(args.eval_size, 0))
    ekey = jax.random.PRNGKey(12345)
    tests = [(0, evaluate(state[0], x_eval, ekey))]
    history, train_time, first = [], 0.0, None
    batches = train.batches(50, np.random.default_rng(args.seed + 1000), args.num_steps)
    for step, (_idx, x) in enumerate(batches, 1):
        t = time.perf_counter()
        state, loss = update(state, jnp.asarray(x))
        loss = float(loss)
        dt = time.perf_counter() - t
        if first is None:
            first = dt
        else:
            train_time += dt
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        history.append((step, -loss))
        if step % args.eval_every == 0 or step == args.num_steps:
            tests.append((step, evaluate(state[0], x_eval, jax.random.fold_in(ekey, step))))
    x_test = jnp.asarray(test.fixed_binarization(None, 0))
    final = evaluate(state[0], x_test, jax.random.PRNGKey(999))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"disarm_reference_jax_s{args.seed}"
    steps = len(history)
    result = {
        "example": "disarm_reference_jax", "backend": "jax (hand-written)", "model": "linear1",
        "estimator": "disarm", "steps": steps, "batch_size": 50, "seed": args.seed,
        "train_objective_last10pct": common.mean_last(history),
        "test_bound_100_subset": tests[-1][1], "eval_size": int(x_eval.shape[0]),
        "test_bound_100": final, "test_size": int(x_test.shape[0]),
        "ms_per_step": 1000 * train_time / max(1, steps - 1), "first_step_s": first,
        "wall_time_s": time.perf_counter() - t0, "plot": str(args.out / f"{name}.png"),
    }
    common.save_plot(args.out / f"{name}.png", history, tests,
                     "hand-written JAX DisARM, linear1, dynamic MNIST", "test 100-sample bound")
    return common.finish(args, name, result, history, tests)


if __name__ == "__main__":
    main()
