"""
Reference for the REBAR-table generative linear one-layer row of ``RESULTS.md``:
a hand-written jitted JAX REBAR step (no NumPyro, no plugin) of the setup of
``examples/sbn.py --preset rebar --model linear1 --estimator rebar``, with the
temperature and the control-variate scale adapted on the variance gradient as
the plugin's ``REBAR_ELBO(adapt=True)`` does in that example.

Setup (Tucker et al. 2017, App. G; ../shared/REFERENCE_RESULTS.md): linear
one-layer SBN with 200 latents, ``b ~ Bern(sigma(c_0))``,
``x ~ Bern(sigma((2b - 1) W + c))``, ``q(b | x) = Bern(sigma((x - xbar) V + d))``,
statically binarized MNIST, batch 24, Adam (beta2 = 0.99999) lr 3e-4 on the
per-example ELBO (the minibatch mean). Same initial parameters and data order as
``examples/sbn.py`` with the same ``--seed``; the noise draws differ (JAX keys of
their own), so runs agree in distribution, not draw by draw.

The estimator (REBAR eq. (4) with the terms of App. G.2). With logits
:math:`\\alpha`, :math:`u \\sim U(0, 1)`, :math:`z = \\alpha + \\mathrm{logit}(1 - u)`,
:math:`b = 1[z > 0]`, the conditional :math:`\\tilde z \\mid b` with the common
random numbers of App. G.2 (equal to :math:`z` in value; App. C)::

    z~ = softplus(logit v + softplus(alpha))        b = 1, logit v = log(sigma(alpha) - u) - log u
    z~ = -softplus(-logit v + softplus(-alpha))     b = 0, logit v = log(1 - u) - log(u - sigma(alpha))

(``v`` held fixed), and :math:`f_n(v) = \\log p(x_n, v) - \\log q(v \\mid x_n)`
evaluated at relaxed values ``v`` in (0, 1) through the logits, the surrogate of
example ``n`` is::

    f_n(b) + sum_i alpha_ni sg([f_n(b) - eta f_n(s(z~))] (b_ni - sigma(alpha_ni)))
           + eta [f_n(s(z)) - f_n(s(z~))],      s(z) = sigma(z / lambda),

``f_n(b)``'s ``log q`` detached, the relaxed terms differentiated totally, as in
the plugin (the decoder and prior get their pathwise gradient at ``b``; their
``eta [grad f(s(z)) - grad f(s(z~))]`` is exactly 0, since ``z~ = z`` in value and
they see only the value). The temperature
``lambda = 0.01 + exp(rho)`` and ``eta = 2 sigmoid(kappa)`` (NumPyro's
transforms of the plugin's constraints) get the single-sample variance gradient
``N d/d(rho, kappa) mean(g_phi^2)`` (RELAX eq. (6); ``g_phi`` the estimator's
gradient of the per-example loss over every parameter: the plugin takes the guide's
params, and ``examples/sbn.py``'s guide declares all of them through ``bk.params()``;
``N`` the training-set size: the plugin differentiates the data-set loss's gradient
and the example divides by ``N``), by a second reverse pass with the same noise, with Adam
at 10x the learning rate (REBAR App. G), as ``examples/common.py`` does.

    python benchmarks/rebar_reference_jax.py --num-steps 2000000
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

common.limit_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.lax import stop_gradient as sg  # noqa: E402
import optax  # noqa: E402

from data import DATA_DIR, load_mnist  # noqa: E402
from disarm_reference_jax import encoder_logits, init_params, iwae, log_bern  # noqa: E402

TEMPERATURE_MIN = 0.01
ADAPTED_LR_FACTOR = 10.0


def log_joint(P, x, b, a):
    """``log p(x, b) - log q(b | x)`` per example, ``b`` entering the decoder as 2b - 1."""
    return (log_bern(b, P["prior_logits"]) + log_bern(x, (2 * b - 1) @ P["dec0_W"] + P["dec0_b"])
            - log_bern(b, a))


def conditional(alpha, u, b):
    """:math:`\\tilde z \\mid b` with App. G.2's common random numbers (module doc)."""
    p = jax.nn.sigmoid(sg(alpha))
    tiny = jnp.finfo(u.dtype).tiny
    logit_v = sg(jnp.where(b > 0, jnp.log(jnp.maximum(p - u, tiny)) - jnp.log(u),
                           jnp.log1p(-u) - jnp.log(jnp.maximum(u - p, tiny))))
    return jnp.where(b > 0, jax.nn.softplus(logit_v + jax.nn.softplus(alpha)),
                     -jax.nn.softplus(-logit_v + jax.nn.softplus(-alpha)))


def shown_values(setup, psi):
    """``(lambda, eta)`` to report (the authors' setup: the mean of its etas)."""
    if setup == "authors":
        etas = [2 * jax.nn.sigmoid(k) for k in psi["kappa"].values()]
        return jnp.exp(psi["rho"]), sum(etas) / len(etas)
    return adapted_values(psi)


def adapted_values(psi):
    """``(lambda, eta)`` from their unconstrained values ``psi``."""
    return TEMPERATURE_MIN + jnp.exp(psi["rho"]), 2 * jax.nn.sigmoid(psi["kappa"])


def surrogate(P, psi, u, x, mean):
    """(-(surrogate), -(per-example ELBO)) of one REBAR draw with uniforms ``u``
    (one per example and latent), averaged over the batch."""
    lam, eta = adapted_values(psi)
    a = encoder_logits(P, x, mean)
    z = a + jnp.log1p(-u) - jnp.log(u)
    b = sg((z > 0).astype(a.dtype))
    f_b = log_joint(P, x, b, sg(a))
    f_z = log_joint(P, x, jax.nn.sigmoid(z / lam), a)
    f_zt = log_joint(P, x, jax.nn.sigmoid(conditional(a, u, b) / lam), a)
    coef = (sg(f_b) - eta * f_zt)[:, None] * (b - jax.nn.sigmoid(sg(a)))
    surr = f_b + jnp.sum((a - sg(a)) * coef, -1) + eta * (f_z - f_zt)
    return -jnp.mean(surr), -jnp.mean(f_b)


def mean_square(g):
    """The mean of the squared gradient over all its coordinates."""
    return sum(jnp.sum(v * v) for v in g.values()) / sum(v.size for v in g.values())


def variance(P, psi, u, x, mean, num_data):
    """``(N mean(g^2), (g, -ELBO))``: the objective of ``psi`` and the estimator ``g``."""
    (_, loss), g = jax.value_and_grad(surrogate, has_aux=True)(P, psi, u, x, mean)
    return num_data * mean_square(g), (g, loss)


def step_grads(P, psi, u, x, mean, num_data):
    """Gradients of every network param (the estimator) and of ``psi`` (the
    variance gradient), and the minibatch's -ELBO."""
    dpsi, (g, loss) = jax.grad(variance, 1, has_aux=True)(P, psi, u, x, mean, num_data)
    return g, dpsi, loss


def write_partial(args, history, tests, adapted):
    """The run so far (binned curve, tests, adapted values) in ``<out>/partial.json``,
    rewritten at each evaluation: a run stopped before its end leaves its curve."""
    args.out.mkdir(parents=True, exist_ok=True)
    h = np.asarray(history)
    curve = [[float(c[-1, 0]), float(c[:, 1].mean())]
             for c in np.array_split(h, max(1, len(h) // 10_000))]
    (args.out / "partial.json").write_text(json.dumps(
        {"steps": len(history), "curve": curve, "tests": tests, "adapted": adapted}) + "\n")


# -- the authors' setup (tensorflow/models research/rebar, SBNDynamicRebar) --------


def authors_psi(key, dim, hidden=100):
    """The authors' adapted params: log temperature (init log 0.5), one eta per
    parameter tensor (``2 sigmoid(0)``), and the input-dependent baseline
    ``x - xbar -> 100 tanh -> 1`` (TF1 variance-scaling init, zero biases)."""
    k1, k2 = jax.random.split(key)

    def w(k, n_in, n_out):  # variance_scaling_initializer(): truncated normal, sd sqrt(1.3 * 2 / n_in)
        return jax.random.truncated_normal(k, -2.0, 2.0, (n_in, n_out)) * math.sqrt(2.6 / n_in)

    return {"rho": jnp.log(jnp.float32(0.5)),
            "kappa": {k: jnp.float32(0.0) for k in PARAM_NAMES},
            "baseline": {"W0": w(k1, dim, hidden), "b0": jnp.zeros(hidden),
                         "W1": w(k2, hidden, 1), "b1": jnp.zeros(1)}}


PARAM_NAMES = ("prior_logits", "dec0_W", "dec0_b", "enc0_W", "enc0_b")


def authors_variance(P, psi, u, x, mean, num_data=None):
    """``(mean(g^2), (g, -ELBO))`` of the authors' estimator ``g``. Differences from
    :func:`variance`: the REINFORCE signal is centred by a learned baseline
    ``B(x)``; the relaxation is MuProp's ``sigma(z / lambda + alpha lambda / (lambda + 1))``
    (``alpha`` differentiated, as theirs); each parameter tensor ``v`` has its own
    ``eta_v`` multiplying its control-variate gradient,
    ``g_v = grad_v[-(f(b) - B) log q(b) - log p(x, b)]
    + eta_v grad_v[f(s(z~)) log q(b) - f(s(z)) + f(s(z~))]`` (``rebar.py``,
    ``get_dynamic_rebar_gradient``); the temperature, the etas and ``B`` are trained on
    ``mean(g^2)`` over all parameters (model and guide), ``lambda = exp(rho)``, without
    the factor ``N`` (their loss is the per-example one)."""
    lam = jnp.exp(psi["rho"])
    a = encoder_logits(P, x, mean)
    logistic = jnp.log1p(-u) - jnp.log(u)
    b = sg((a + logistic > 0).astype(a.dtype))
    h = jnp.tanh((x - mean) @ psi["baseline"]["W0"] + psi["baseline"]["b0"])
    base = (h @ psi["baseline"]["W1"] + psi["baseline"]["b1"])[:, 0]
    score = b - jax.nn.sigmoid(sg(a))

    def f_loss(P_):
        a_ = encoder_logits(P_, x, mean)
        f_b = log_joint(P_, x, b, sg(a_))
        coef = (sg(f_b) - base)[:, None] * score
        return -jnp.mean(f_b + jnp.sum((a_ - sg(a_)) * coef, -1)), -jnp.mean(f_b)

    def h_loss(P_):
        a_ = encoder_logits(P_, x, mean)

        def relax(z):
            return jax.nn.sigmoid(z / lam + a_ * lam / (lam + 1))

        f_z = log_joint(P_, x, relax(a_ + logistic), a_)
        f_zt = log_joint(P_, x, relax(conditional(a_, u, b)), a_)
        return jnp.mean(jnp.sum((a_ - sg(a_)) * f_zt[:, None] * score, -1) - f_z + f_zt)

    (_, loss), fg = jax.value_and_grad(f_loss, has_aux=True)(P)
    hg = jax.grad(h_loss)(P)
    g = {k: fg[k] + 2 * jax.nn.sigmoid(psi["kappa"][k]) * hg[k] for k in P}
    return mean_square(g), (g, loss)


def authors_step_grads(P, psi, u, x, mean, num_data=None):
    """As :func:`step_grads` for :func:`authors_variance`."""
    dpsi, (g, loss) = jax.grad(authors_variance, 1, has_aux=True)(P, psi, u, x, mean)
    return g, dpsi, loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-steps", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA_DIR / "binarized_mnist.npz")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--temperature", type=float, default=0.5,
                   help="initial temperature (--setup plugin; the authors': 0.5)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="initial eta (--setup plugin; the authors': 1 per tensor)")
    p.add_argument("--setup", choices=("plugin", "authors"), default="plugin",
                   help="plugin: REBAR_ELBO's estimator in examples/sbn.py; authors: "
                   "their released SBNDynamicRebar (learned baseline, MuProp relaxation, "
                   "per-tensor eta, variance over all params)")
    p.add_argument("--eval-every", type=int, default=100_000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "rebar_reference")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--backend", default="jax", help="ignored (for reproduce.py)")
    p.add_argument("--overwrite", action="store_true", help="ignored (for reproduce.py)")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS,
                   help="intra-op threads (read before jax is imported; 0: XLA's choice)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    train = load_mnist(args.data, "static", "train")
    test = load_mnist(args.data, "static", "test")
    rng = np.random.default_rng(args.seed)
    P = init_params(train, rng)
    mean = jnp.asarray(train.mean().astype(np.float32))
    num_data = float(len(train))
    if args.setup == "authors":
        psi = authors_psi(jax.random.PRNGKey(args.seed + 7), train.dim)
        grads_fn = authors_step_grads
    else:
        psi = {"rho": jnp.log(jnp.float32(args.temperature - TEMPERATURE_MIN)),
               "kappa": jnp.float32(math.log(args.eta / (2 - args.eta)))}
        grads_fn = step_grads
    betas = dict(b1=0.9, b2=0.99999)
    tx, tx_psi = optax.adam(args.lr, **betas), optax.adam(ADAPTED_LR_FACTOR * args.lr, **betas)
    state = (P, psi, tx.init(P), tx_psi.init(psi), jax.random.PRNGKey(args.seed))

    @jax.jit
    def update(state, x):
        params, psi, opt, opt_psi, key = state
        key, sub = jax.random.split(key)
        u = jax.random.uniform(sub, (x.shape[0], params["enc0_b"].shape[-1]),
                               minval=jnp.finfo(jnp.float32).tiny)
        g, dpsi, loss = grads_fn(params, psi, u, x, mean, num_data)
        upd, opt = tx.update(g, opt, params)
        upd_psi, opt_psi = tx_psi.update(dpsi, opt_psi, psi)
        return (optax.apply_updates(params, upd), optax.apply_updates(psi, upd_psi), opt,
                opt_psi, key), loss

    bound = jax.jit(lambda params, key, x: jnp.mean(iwae(params, key, x, mean, joint=log_joint)))

    def evaluate(params, x, key):
        total = sum(float(bound(params, jax.random.fold_in(key, s), x[s:s + 500]))
                    * len(x[s:s + 500]) for s in range(0, len(x), 500))
        return total / len(x)

    x_eval = jnp.asarray(test.fixed_binarization(args.eval_size, 0))
    ekey = jax.random.PRNGKey(12345)
    tests = [(0, evaluate(state[0], x_eval, ekey))]
    history, adapted, train_time, first = [], [], 0.0, None
    batches = train.batches(24, np.random.default_rng(args.seed + 1000), args.num_steps)
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
            adapted.append((step, *map(float, shown_values(args.setup, state[1]))))
            write_partial(args, history, tests, adapted)
            if not args.no_progress:
                print(f"step {step}: train {common.mean_last(history):.3f} test {tests[-1][1]:.3f}"
                      f" temperature {adapted[-1][1]:.4f} eta {adapted[-1][2]:.4f}", flush=True)
    x_test = jnp.asarray(test.fixed_binarization(None, 0))
    final = evaluate(state[0], x_test, jax.random.PRNGKey(999))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"rebar_reference_jax_{args.setup}_s{args.seed}"
    steps = len(history)
    result = {
        "example": "rebar_reference_jax", "backend": "jax (hand-written)", "model": "linear1",
        "estimator": "rebar", "setup": args.setup, "steps": steps, "batch_size": 24, "lr": args.lr, "seed": args.seed,
        "train_objective_last10pct": common.mean_last(history),
        "test_bound_100_subset": tests[-1][1], "eval_size": int(x_eval.shape[0]),
        "test_bound_100": final, "test_size": int(x_test.shape[0]),
        "temperature": adapted[-1][1], "eta": adapted[-1][2], "adapted": adapted,
        "ms_per_step": 1000 * train_time / max(1, steps - 1), "first_step_s": first,
        "wall_time_s": time.perf_counter() - t0, "plot": str(args.out / f"{name}.png"),
    }
    common.save_plot(args.out / f"{name}.png", history, tests,
                     f"hand-written JAX REBAR ({args.setup}'s setup), linear1, static MNIST",
                     "test 100-sample bound")
    return common.finish(args, name, result, history, tests)


if __name__ == "__main__":
    main()
