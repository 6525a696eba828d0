"""
Reference for the ReinMax-harness rows of ``RESULTS.md``: a hand-written jitted
JAX step (no NumPyro, no plugin) of ``examples/categorical_vae.py`` with ReinMax
or ReinMax-CV, to tell a gap to the published figures that comes from the
setup (the KL term) from one that comes from the plugin.

Setup (Liu et al. 2023, ``LiyuanLucasLiu/ReinMax`` ``mnist_vae``; Wang & Bui
2026, ``danielwang0452/ReinMax_ASC`` ``run_reinmax_cv.py``): L one-hot
variables of C classes ("C x L"), encoder 784-512-256-(L*C), decoder
(L*C)-256-512-784, ReLU, uniform prior, grey MNIST values in [0, 1] as
Bernoulli targets, all 60,000 training images, batch 100, the example's tuned
optimizer, lr, temperature and eta for the size. Same initial parameters
(``categorical_vae.init_params``) and data order (``Dataset.batches`` with
``seed + 1000``) as ``examples/categorical_vae.py`` with the same ``--seed``;
the Monte Carlo noise is drawn differently (JAX keys of this script).

Per example, with :math:`\\alpha` the (L, C) logits, :math:`\\pi = \\mathrm{softmax}(\\alpha)`,
:math:`G = -\\log(-\\log u)`, :math:`D = \\mathrm{onehot}(\\arg\\max(\\alpha + G))`,
:math:`J(p)g = p \\odot g - p\\,(p^\\top g)` (softmax Jacobian at output p):

* objective ``--kl sample`` (ours, the plugin's): the one-sample ELBO
  :math:`\\log p(x\\mid D) + \\sum_l D_l^\\top(\\log\\tfrac1C - \\log\\pi_l)`, differentiated
  through :math:`D` (the estimator below) and explicitly through :math:`\\log\\pi`
  (the score term :math:`D - \\pi`);
* ``--kl analytic`` (the authors' ``VAE.forward_approx``): :math:`\\log p(x\\mid D) -
  \\sum_l \\pi_l^\\top\\log(C\\pi_l)`, the KL to the uniform prior in closed form
  (exact gradient :math:`J(\\pi)\\log\\pi`), so :math:`D` only enters the decoder.

The estimator replaces :math:`\\partial D/\\partial\\alpha` in the backward pass
(``jax.custom_vjp``, the Jacobian-vector products written out), for the upstream
gradient :math:`g = \\partial f/\\partial D`:

* ``reinmax`` (Liu et al. 2023, Alg. 2): :math:`2J(\\pi_{1/2})g - \\tfrac12 J(\\pi)g`,
  :math:`\\pi_{1/2} = \\tfrac12(\\mathrm{softmax}(\\alpha/\\tau) + D)`;
* ``reinmax_cv`` (authors' form, ``docs/estimators/reinmax_cv.rst``): ReinMax at
  :math:`\\tau = 1` plus :math:`\\eta\\big(\\tfrac1K\\sum_k\\tfrac1\\tau J(\\mathrm{softmax}(\\tilde z_k/\\tau))
  - \\tfrac1\\tau J(\\mathrm{softmax}(\\theta_D + S))\\big)g`, :math:`\\theta_D = \\log\\tfrac12(\\pi + D)`,
  :math:`\\tilde z_k \\sim (\\theta_D + G' \\mid \\arg\\max = D)` (REBAR App. C: with
  :math:`E \\sim \\mathrm{Exp}(1)`, top :math:`\\log Z - \\log E_D`, others
  :math:`-\\log(E_i e^{-\\theta_i} + E_D/Z)`), :math:`S = \\mathrm{softmax}((\\alpha + G)/\\tau)`
  the forward soft sample, K = ``--rao-samples`` (100).

Reported as ``examples/categorical_vae.py`` (its JSON keys): the training
objective per step (the minibatch mean of the objective above; its mean over
the last epoch is what the authors report as train -ELBO), the one-sample test
ELBO with the sample KL (``test_elbo``), the authors' test figure (one
decoder sample, analytic KL; ``test_elbo_analytic_kl``; equal in expectation)
and the 100-sample bound.

    python benchmarks/cvae_reference_jax.py --latent 4x24 --estimator reinmax_cv --kl analytic
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

import categorical_vae  # noqa: E402  (its TUNED table and init_params)
from data import DATA_DIR, Dataset, load_mnist  # noqa: E402


# ---------------------------------------------------------------------------
# the estimators' backward passes, written out


def jvp_softmax(p, g):
    """:math:`J(p)g = p \\odot g - p\\,(p^\\top g)` over the last axis (J symmetric)."""
    return p * g - p * jnp.sum(p * g, -1, keepdims=True)


def conditional_gumbel_logits(theta, D, v):
    """Perturbed logits :math:`\\theta + G' \\mid \\arg\\max = D` from uniforms ``v``
    of shape (K,) + theta.shape (REBAR App. C, Gumbel-Rao eq. 9)."""
    E = -jnp.log(v)
    logZ = jax.nn.logsumexp(theta, -1, keepdims=True)
    E_top = jnp.sum(E * D, -1, keepdims=True)
    top = logZ - jnp.log(E_top)
    rest = -jnp.log(E * jnp.exp(-theta) + E_top * jnp.exp(-logZ))
    return jnp.where(D > 0, top, rest)


@jax.custom_vjp
def st_sample(alpha, D, A, B, W):
    """Value ``D``; the backward pass maps g to :math:`\\sum_j w_j J(p_j) g` for the
    probability vectors ``P = (A, B)`` stacked with weights ``W`` (see :func:`backward_terms`)."""
    return D


def _st_fwd(alpha, D, A, B, W):
    return D, (A, B, W)


def _st_bwd(res, g):
    A, B, W = res
    # A: (m, ..., C) probability vectors with weights W[:m]; B: (K, ..., C), the
    # Gumbel-Rao draws, weight W[m] each divided by K (so B is averaged)
    ga = sum(W[i] * jvp_softmax(A[i], g) for i in range(A.shape[0]))
    gb = W[A.shape[0]] * jnp.mean(jvp_softmax(B, g[None]), 0)
    zeros = jnp.zeros_like(g)
    return ga + gb, zeros, jnp.zeros_like(A), jnp.zeros_like(B), jnp.zeros_like(W)


st_sample.defvjp(_st_fwd, _st_bwd)


def backward_terms(estimator, alpha, D, G, v, tau, eta):
    """
    (A, B, W) of :func:`st_sample` (all detached), so that the estimated
    :math:`\\hat g_\\alpha = \\sum_i W_i J(A_i) g + W_m \\tfrac1K\\sum_k J(B_k) g`:

    * reinmax: A = (pi_half, pi), W = (2, -1/2, 0);
    * reinmax_cv: A = (pi_half(tau=1), pi, softmax(theta_D + S)),
      W = (2, -1/2, -eta/tau, eta/tau), B = softmax(z_k / tau).
    """
    alpha = stop_gradient(alpha)
    pi = jax.nn.softmax(alpha, -1)
    if estimator == "reinmax":
        half = 0.5 * (jax.nn.softmax(alpha / tau, -1) + D)
        A = jnp.stack([half, pi])
        B = jnp.zeros((1,) + alpha.shape, alpha.dtype)
        W = jnp.array([2.0, -0.5, 0.0], alpha.dtype)
        return A, B, W
    half = 0.5 * (pi + D)
    theta = jnp.log(half)
    S = jax.nn.softmax((alpha + G) / tau, -1)
    A = jnp.stack([half, pi, jax.nn.softmax(theta + S, -1)])
    B = jax.nn.softmax(conditional_gumbel_logits(theta, D, v) / tau, -1)
    W = jnp.array([2.0, -0.5, -eta / tau, eta / tau], alpha.dtype)
    return A, B, W


# ---------------------------------------------------------------------------
# the model


def mlp(P, name, x):
    return common.mlp(P, name, x, 3, jax.nn.relu)


def log_lik(P, x, z):
    """:math:`\\log p(x\\mid z)` of grey targets ``x`` (sum over pixels), ``z`` (B, L, C)."""
    logits = mlp(P, "dec", z.reshape(z.shape[:-2] + (-1,)))
    return jnp.sum(x * logits - jax.nn.softplus(logits), -1)


def encode(P, x, L, C):
    return mlp(P, "enc", x).reshape(x.shape[:-1] + (L, C))


def sample_noise(key, alpha, K):
    """Forward Gumbels G, the hard sample D, and the K conditional uniforms."""
    ku, kv = jax.random.split(key)
    tiny = jnp.finfo(alpha.dtype).tiny
    u = jax.random.uniform(ku, alpha.shape, alpha.dtype, minval=tiny)
    G = -jnp.log(-jnp.log(u))
    D = jax.nn.one_hot(jnp.argmax(stop_gradient(alpha) + G, -1), alpha.shape[-1],
                       dtype=alpha.dtype)
    v = jax.random.uniform(kv, (K,) + alpha.shape, alpha.dtype, minval=tiny)
    return G, D, v


def objective(P, key, x, cfg):
    """Minibatch-mean objective (what is maximised) of ``cfg['kl']``."""
    L, C = cfg["L"], cfg["C"]
    alpha = encode(P, x, L, C)
    G, D, v = sample_noise(key, alpha, cfg["K"] if cfg["estimator"] == "reinmax_cv" else 1)
    A, B, W = backward_terms(cfg["estimator"], alpha, D, G, v, cfg["tau"], cfg["eta"])
    z = st_sample(alpha, D, A, B, W)
    logpi = jax.nn.log_softmax(alpha, -1)
    if cfg["kl"] == "sample":  # log q(D) - log p(D), differentiable in z and in log pi
        kl = jnp.sum(z * (logpi + math.log(C)), (-2, -1))
    else:  # sum_l pi_l . log(C pi_l)
        kl = jnp.sum(jnp.exp(logpi) * (logpi + math.log(C)), (-2, -1))
    return jnp.mean(log_lik(P, x, z) - kl)


def log_weights(P, key, x, L, C, analytic=False):
    """One draw per example: log p(x, D) - log q(D) (or log p(x|D) - KL)."""
    alpha = encode(P, x, L, C)
    _, D, _ = sample_noise(key, alpha, 1)
    logpi = jax.nn.log_softmax(alpha, -1)
    if analytic:
        kl = jnp.sum(jnp.exp(logpi) * (logpi + math.log(C)), (-2, -1))
    else:
        kl = jnp.sum(D * (logpi + math.log(C)), (-2, -1))
    return log_lik(P, x, D) - kl


def make_bound(L, C, chunk=500, sample_chunk=10):
    @jax.jit
    def lse(P, keys, x):
        return jax.nn.logsumexp(jax.vmap(lambda k: log_weights(P, k, x, L, C))(keys), 0)

    analytic = jax.jit(lambda P, key, x: jnp.sum(log_weights(P, key, x, L, C, True)))

    def bound(P, key, x, K):
        """Mean over examples of the K-sample bound (K = 1: the one-sample ELBO)."""
        total = 0.0
        for s in range(0, len(x), chunk):
            xs, acc = jnp.asarray(x[s:s + chunk]), None
            for j in range(0, K, sample_chunk):
                k = min(sample_chunk, K - j)
                keys = jax.random.split(jax.random.fold_in(key, s * K + j), k)
                part = lse(P, keys, xs)
                acc = part if acc is None else jnp.logaddexp(acc, part)
            total += float(jnp.sum(acc - math.log(K)))
        return total / len(x)

    def bound_analytic(P, key, x):
        return sum(float(analytic(P, jax.random.fold_in(key, s), jnp.asarray(x[s:s + chunk])))
                   for s in range(0, len(x), chunk)) / len(x)

    return bound, bound_analytic


def make_optimizer(name, lr):
    return {"adam": optax.adam, "radam": optax.radam}[name](lr)


# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", default="4x24")
    p.add_argument("--estimator", choices=("reinmax", "reinmax_cv"), default="reinmax_cv")
    p.add_argument("--kl", choices=("sample", "analytic"), default="analytic")
    p.add_argument("--num-steps", type=int, default=96_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--optim", choices=("adam", "radam"), default=None)
    p.add_argument("--rao-samples", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--data", type=Path, default=DATA_DIR / "mnist.npz")
    p.add_argument("--eval-every", type=int, default=4800)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "cvae_reference")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--backend", default="jax", help="ignored (for reproduce.py)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS,
                   help="intra-op threads (read before jax is imported; 0: XLA's choice)")
    args = p.parse_args(argv)
    args.C, args.L = (int(s) for s in args.latent.lower().split("x"))
    lr, tau, optim, eta = categorical_vae.tuned(args.latent, args.estimator)
    args.lr = lr if args.lr is None else args.lr
    args.temperature = tau if args.temperature is None else args.temperature
    args.optim = optim if args.optim is None else args.optim
    args.eta = (eta or 0.0) if args.eta is None else args.eta
    return args


def main(argv=None):
    args = parse_args(argv)
    name = f"cvae_reference_jax_{args.latent}_{args.estimator}_{args.kl}_s{args.seed}"
    common.check_outputs(args, name)
    t0 = time.perf_counter()
    train_set = Dataset(load_mnist(args.data, "dynamic", "train_full").probs, "grey", "train")
    test_set = Dataset(load_mnist(args.data, "dynamic", "test").probs, "grey", "test")
    P = {k: jnp.asarray(v) for k, v in
         categorical_vae.init_params(args, np.random.default_rng(args.seed)).items()}
    cfg = {"L": args.L, "C": args.C, "K": args.rao_samples, "estimator": args.estimator,
           "tau": args.temperature, "eta": args.eta, "kl": args.kl}
    tx = make_optimizer(args.optim, args.lr)
    state = (P, tx.init(P), jax.random.PRNGKey(args.seed))

    @jax.jit
    def update(state, x):
        params, opt_state, key = state
        key, sub = jax.random.split(key)
        value, grads = jax.value_and_grad(lambda q: -objective(q, sub, x, cfg))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), -value

    bound, bound_analytic = make_bound(args.L, args.C)
    K, ekey = args.eval_samples, jax.random.PRNGKey(12345)
    x_eval = test_set.probs[common.eval_subset(len(test_set), args.eval_size, args.test_seed)]
    tests = [(0, bound(state[0], ekey, x_eval, K))]
    history, train_time, first = [], 0.0, None
    batches = train_set.batches(args.batch_size, np.random.default_rng(args.seed + 1000),
                                args.num_steps)
    for step, (_idx, x) in enumerate(batches, 1):
        t = time.perf_counter()
        state, value = update(state, jnp.asarray(x))
        value = float(value)
        dt = time.perf_counter() - t
        if first is None:
            first = dt
        else:
            train_time += dt
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite objective at step {step}")
        history.append((step, value))
        if step % args.eval_every == 0 or step == args.num_steps:
            tests.append((step, bound(state[0], jax.random.fold_in(ekey, step), x_eval, K)))
            if not args.no_progress:
                print(f"step {step}: train (last 600) {np.mean([h[1] for h in history[-600:]]):.2f}"
                      f" test bound {tests[-1][1]:.2f}", file=sys.stderr, flush=True)
    t_eval = time.perf_counter()
    x_test = test_set.probs
    final = bound(state[0], jax.random.PRNGKey(999), x_test, K)
    final_elbo = bound(state[0], jax.random.PRNGKey(998), x_test, 1)
    final_analytic = bound_analytic(state[0], jax.random.PRNGKey(997), x_test)
    final_eval_s = time.perf_counter() - t_eval
    args.out.mkdir(parents=True, exist_ok=True)
    steps = len(history)
    epoch = -(-len(train_set) // args.batch_size)
    result = {
        "example": "cvae_reference_jax", "backend": "jax (hand-written)", "latent": args.latent,
        "estimator": args.estimator, "kl": args.kl, "steps": steps,
        "epochs": steps * args.batch_size / len(train_set), "batch_size": args.batch_size,
        "lr": args.lr, "optim": args.optim, "temperature": args.temperature,
        "eta": args.eta if args.estimator == "reinmax_cv" else None,
        "cv_form": "authors" if args.estimator == "reinmax_cv" else None,
        "rao_samples": args.rao_samples if args.estimator == "reinmax_cv" else None,
        "seed": args.seed, "data": str(args.data), "targets": "grey/255",
        "train_objective_last10pct": common.mean_last(history),
        "train_objective_last_epoch": (float(np.mean([h[1] for h in history[-epoch:]]))
                                       if steps >= epoch else None),
        f"test_bound_{K}_subset": tests[-1][1], "eval_size": len(x_eval),
        "test_elbo": final_elbo, "test_elbo_analytic_kl": final_analytic,
        f"test_bound_{K}": final, "test_size": len(x_test),
        "ms_per_step": 1000 * train_time / max(1, steps - 1), "first_step_s": first,
        "steps_per_s": (steps - 1) / train_time if train_time else None,
        "final_eval_s": final_eval_s, "wall_time_s": time.perf_counter() - t0,
        "plot": str(args.out / f"{name}.png"),
    }
    common.save_plot(args.out / f"{name}.png", history, tests,
                     f"hand-written JAX {args.estimator}, {args.latent}, KL {args.kl}",
                     f"test {K}-sample bound ({len(x_eval)} examples)", final=(final, len(x_test)))
    return common.finish(args, name, result, history, tests)


if __name__ == "__main__":
    main()
