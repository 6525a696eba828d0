"""
Benchmark: ``numpyro_binary_grads.DisARM_ELBO`` + ``SVI.update`` under ``jit``
against a hand-written jitted JAX DisARM step of the same math and against
NumPyro's ``TraceGraph_ELBO`` (+ ``SVI.update`` under ``jit``).

Model: linear one-layer SBN 784-200 (as ``examples/sbn.py``), batch 50, dynamic
binarization of ``shared/data/mnist.npz`` (train = first 50000 images), float32.
The three trainers start from the same initial parameters, use the same
optimizer (``optax.adam``) and see the same data stream; they run in one
process, interleaved in blocks of ``--block`` steps, round-robin. The minibatch
ELBO is scaled to the data set with ``handlers.scale(num_data / batch)`` in a
plate of the batch size (NumPyro's ``plate(subsample_size=...)`` would draw a
random permutation of 50000 rows inside every step, which no hand-written step
pays); the hand-written step uses the same scale.

Reported: ms/step per trainer (median over blocks; compile time excluded and
printed apart), the ratio ours / hand-written (target <= 1.1), and the train
ELBO (nats per example) after the same number of steps: the mean minibatch
-loss over the last quarter of the steps and a one-sample ELBO on 1000 fixed
training images (fixed binarization, 5 draws of b).

Usage::

    python benchmarks/bench_numpyro_disarm.py --steps 2000
    python benchmarks/bench_numpyro_disarm.py --steps 2000 --batch-size 500

Note: NumPyro's TraceGraph_ELBO differentiates ``Bernoulli(logits=0.).log_prob``
(wrong gradient at logits exactly 0, here the zero-initialized prior logits) and
is plain REINFORCE with the per-example cost as baseline-free signal: its ELBO
is expected to lag.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient
import optax

import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import SVI, TraceGraph_ELBO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.append(str(ROOT))  # an installed numpyro_binary_grads wins over the checkout
from data import add_data_argument, centring_offset, load_mnist, output_bias_init  # noqa: E402

from numpyro_binary_grads import DisARM_ELBO  # noqa: E402


# ----------------------------------------------------------------------------
# parameters, model and guide


def init_params(x_dim, hidden, output_bias, seed=0):
    """nn.Linear-style uniform(+-1/sqrt(fan_in)) init, zero prior logits."""
    r = np.random.default_rng(seed)
    lim_d, lim_e = 1 / np.sqrt(hidden), 1 / np.sqrt(x_dim)
    return {
        "prior_logits": np.zeros(hidden, np.float32),
        "dec_W": r.uniform(-lim_d, lim_d, (hidden, x_dim)).astype(np.float32),
        "dec_b": np.asarray(output_bias, np.float32),
        "enc_W": r.uniform(-lim_e, lim_e, (x_dim, hidden)).astype(np.float32),
        "enc_b": r.uniform(-lim_e, lim_e, hidden).astype(np.float32),
    }


def make_model_and_guide(params0, input_mean):
    hidden = params0["prior_logits"].shape[0]

    def model(x, num_data):
        prior = numpyro.param("prior_logits", params0["prior_logits"])
        W = numpyro.param("dec_W", params0["dec_W"])
        c = numpyro.param("dec_b", params0["dec_b"])
        with numpyro.plate("data", x.shape[0], dim=-1), handlers.scale(scale=num_data / x.shape[0]):
            b = numpyro.sample("b", dist.Bernoulli(logits=prior).expand([hidden]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=b @ W + c).to_event(1), obs=x)

    def guide(x, num_data):
        W = numpyro.param("enc_W", params0["enc_W"])
        c = numpyro.param("enc_b", params0["enc_b"])
        with numpyro.plate("data", x.shape[0], dim=-1), handlers.scale(scale=num_data / x.shape[0]):
            numpyro.sample("b", dist.Bernoulli(logits=(x - input_mean) @ W + c).to_event(1))

    return model, guide


# ----------------------------------------------------------------------------
# hand-written DisARM (no NumPyro)


def log_bernoulli(v, logits):
    """log Bernoulli(v | logits) summed over the last dim: v*a - softplus(a)."""
    return jnp.sum(v * logits - jax.nn.softplus(logits), -1)


def hand_loss(params, key, x, num_data, input_mean):
    """
    V + (S - sg S) of one DisARM draw: value the antithetic-pair estimate of
    -ELBO (scaled to the data set), gradient DisARM for the encoder, pathwise
    (averaged over the pair) for the decoder and prior.
    """
    a = (x - input_mean) @ params["enc_W"] + params["enc_b"]
    u = jax.random.uniform(key, a.shape, a.dtype)
    lu = jnp.log(u) - jnp.log1p(-u)
    b = (lu < a).astype(a.dtype)
    bt = (-lu < a).astype(a.dtype)
    a_sg = stop_gradient(a)

    def f(bv):  # per example: log p(x, b) - log q(b | x), log q detached
        return (log_bernoulli(bv, params["prior_logits"])
                + log_bernoulli(x, bv @ params["dec_W"] + params["dec_b"])
                - log_bernoulli(bv, a_sg))

    fs = jax.vmap(f)(jnp.stack([b, bt]))  # (2, B): both evaluations in one pass
    g = 0.5 * (fs[0] - fs[1])[:, None] * (1 - 2 * bt) * (b != bt) * jax.nn.sigmoid(jnp.abs(a_sg))
    scale = num_data / x.shape[0]
    value = -scale * 0.5 * jnp.sum(fs)
    score = -scale * jnp.sum(a * stop_gradient(g))
    return value + (score - stop_gradient(score))


class HandTrainer:
    name = "hand"

    def __init__(self, params0, lr, num_data, input_mean, seed):
        self.opt = optax.adam(lr)
        self.state = (jax.tree.map(jnp.asarray, params0), self.opt.init(params0),
                      jax.random.PRNGKey(seed))
        mean = jnp.asarray(input_mean)

        @jax.jit
        def update(state, x):
            params, opt_state, key = state
            key, sub = jax.random.split(key)
            loss, grads = jax.value_and_grad(hand_loss)(params, sub, x, num_data, mean)
            updates, opt_state = self.opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, key), loss

        self._update = update

    def step(self, x):
        self.state, loss = self._update(self.state, x)
        return loss

    def params(self):
        return self.state[0]


class SVITrainer:
    def __init__(self, name, params0, elbo, lr, num_data, input_mean, seed, x0):
        self.name = name
        self.num_data = num_data
        model, guide = make_model_and_guide(params0, jnp.asarray(input_mean))
        self.svi = SVI(model, guide, optax.adam(lr), elbo)
        self.state = self.svi.init(jax.random.PRNGKey(seed), x0, num_data)
        self._update = jax.jit(self.svi.update, static_argnums=2)

    def step(self, x):
        self.state, loss = self._update(self.state, x, self.num_data)
        return loss

    def params(self):
        return self.svi.get_params(self.state)


# ----------------------------------------------------------------------------


def fixed_set_elbo(params, x, input_mean, reps=5, seed=123):
    """One-sample ELBO per example on fixed images ``x``, averaged over ``reps`` draws of b."""
    a = (x - input_mean) @ params["enc_W"] + params["enc_b"]
    tot = 0.0
    for k in jax.random.split(jax.random.PRNGKey(seed), reps):
        b = jax.random.bernoulli(k, jax.nn.sigmoid(a)).astype(a.dtype)
        f = (log_bernoulli(b, params["prior_logits"])
             + log_bernoulli(x, b @ params["dec_W"] + params["dec_b"])
             - log_bernoulli(b, a))
        tot += float(jnp.mean(f))
    return tot / reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--block", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainers", default="hand,disarm,tracegraph")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--sweep-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the ms/step sweep (default on a GPU: 50 500 5000; "
                        "none on a CPU)")
    p.add_argument("--sweep-steps", type=int, default=200)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"# device: {dev.platform} {getattr(dev, 'device_kind', '')} "
          f"({len(jax.devices())} device(s)), jax {jax.__version__}", flush=True)

    train = load_mnist(args.data, binarize="dynamic", split="train")
    num_data = len(train)
    input_mean = centring_offset(train)
    params0 = init_params(train.dim, args.hidden, output_bias_init(train), args.seed)
    rng = np.random.default_rng(args.seed)
    x0 = jnp.asarray(train.binarized(np.arange(args.batch_size), rng))

    trainers = []
    for name in args.trainers.split(","):
        if name == "hand":
            trainers.append(HandTrainer(params0, args.lr, num_data, input_mean, args.seed))
        elif name == "disarm":
            trainers.append(SVITrainer("disarm", params0, DisARM_ELBO(), args.lr, num_data,
                                       input_mean, args.seed, x0))
        elif name == "tracegraph":
            trainers.append(SVITrainer("tracegraph", params0, TraceGraph_ELBO(), args.lr,
                                       num_data, input_mean, args.seed, x0))
        else:
            raise SystemExit(f"unknown trainer {name!r}")

    compile_s = {}
    for t in trainers:  # compile (and one step) outside the timings
        t0 = time.perf_counter()
        jax.block_until_ready(t.step(x0))
        compile_s[t.name] = time.perf_counter() - t0
    # restart from the same initial parameters after the compile step
    for t in trainers:
        if isinstance(t, HandTrainer):
            t.state = (jax.tree.map(jnp.asarray, params0), t.opt.init(params0),
                       jax.random.PRNGKey(args.seed))
        else:
            t.state = t.svi.init(jax.random.PRNGKey(args.seed), x0, num_data)

    batches = train.batches(args.batch_size, rng, num_steps=args.steps)
    ms = {t.name: [] for t in trainers}
    losses = {t.name: [] for t in trainers}
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        block = [jnp.asarray(x) for _, x in (next(batches) for _ in range(n))]
        jax.block_until_ready(block)
        for t in trainers:
            out = []
            t0 = time.perf_counter()
            for x in block:
                out.append(t.step(x))
            jax.block_until_ready(out)
            ms[t.name].append(1e3 * (time.perf_counter() - t0) / n)
            losses[t.name].extend(float(v) for v in out)
        done += n

    fixed = jnp.asarray(train.fixed_binarization(1000, seed=0))
    mean = jnp.asarray(input_mean)
    results = {"device": str(jax.devices()[0]), "steps": args.steps,
               "batch_size": args.batch_size, "hidden": args.hidden, "trainers": {}}
    tail = max(1, args.steps // 4)
    print(f"device {results['device']}, {args.steps} steps, batch {args.batch_size}, "
          f"SBN 784-{args.hidden}, blocks of {args.block}")
    print(f"{'trainer':<12}{'ms/step':>10}{'compile s':>11}{'train ELBO (last 1/4)':>24}"
          f"{'fixed-set ELBO':>16}")
    for t in trainers:
        med = statistics.median(ms[t.name])
        elbo_tail = -float(np.mean(losses[t.name][-tail:])) / num_data
        elbo_fixed = fixed_set_elbo(t.params(), fixed, mean)
        results["trainers"][t.name] = {"ms_per_step": med, "compile_s": compile_s[t.name],
                                       "train_elbo": elbo_tail, "fixed_set_elbo": elbo_fixed}
        print(f"{t.name:<12}{med:>10.3f}{compile_s[t.name]:>11.2f}{elbo_tail:>24.2f}"
              f"{elbo_fixed:>16.2f}")
    r = results["trainers"]
    if "hand" in r and "disarm" in r:
        ratio = r["disarm"]["ms_per_step"] / r["hand"]["ms_per_step"]
        results["ratio_ours_hand"] = ratio
        print(f"ratio DisARM_ELBO / hand-written: {ratio:.3f} (target <= 1.1)")
    if "tracegraph" in r and "disarm" in r:
        print(f"ratio TraceGraph_ELBO / DisARM_ELBO: "
              f"{r['tracegraph']['ms_per_step'] / r['disarm']['ms_per_step']:.3f}")
    sweep = args.sweep_batches
    if sweep is None:
        sweep = [50, 500, 5000] if dev.platform != "cpu" else []
    if sweep:
        results["sweep_ms_per_step"] = batch_sweep(args, train, params0, input_mean, sweep)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def batch_sweep(args, train, params0, input_mean, batches):
    """ms/step (median of blocks, after compilation) of the hand-written step and
    ``DisARM_ELBO`` at each batch size, on ``jax.devices()[0]``."""
    num_data = len(train)
    out = {}
    print(f"== ms/step by batch size on {jax.devices()[0]} ({args.sweep_steps} steps each)")
    for bs in batches:
        rng = np.random.default_rng(args.seed + bs)
        x0 = jnp.asarray(train.binarized(np.arange(bs), rng))
        trainers = [HandTrainer(params0, args.lr, num_data, input_mean, args.seed),
                    SVITrainer("disarm", params0, DisARM_ELBO(), args.lr, num_data,
                               input_mean, args.seed, x0)]
        for t in trainers:
            jax.block_until_ready(t.step(x0))
        xs = [jnp.asarray(x) for _, x in train.batches(bs, rng, num_steps=args.sweep_steps)]
        jax.block_until_ready(xs)
        row = {}
        for t in trainers:
            blocks = []
            for s in range(0, len(xs), 20):
                t0 = time.perf_counter()
                jax.block_until_ready([t.step(x) for x in xs[s : s + 20]])
                blocks.append(1e3 * (time.perf_counter() - t0) / len(xs[s : s + 20]))
            row[t.name] = statistics.median(blocks)
        out[bs] = row
        print(f"batch {bs:>5}: hand {row['hand']:.3f} ms  disarm {row['disarm']:.3f} ms  "
              f"ratio {row['disarm'] / row['hand']:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()
