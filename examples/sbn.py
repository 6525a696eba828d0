"""
Linear one-layer sigmoid belief network (784-200 by default) on MNIST, trained
with a drop-in ELBO from ``pyro_binary_grads`` (or Pyro's ``TraceGraph_ELBO``).

Model (binary latents in {0, 1})::

    b_n ~ Bernoulli(logits=prior_logits)            (200 independent bits)
    x_n ~ Bernoulli(logits=b_n @ W + c)             (784 pixels)

Guide (inference network, input centred by the training mean)::

    b_n ~ Bernoulli(logits=(x_n - mean) @ V + d)

Both live in a ``pyro.plate("data", N_train, subsample=idx)`` so the ELBO of a
minibatch is scaled to the whole training set; the figures reported are per
example, in nats (``-loss / N_train``), the number the papers report.

Run, e.g.::

    python examples/sbn.py --estimator disarm --num-steps 2000
    python examples/sbn.py --estimator tracegraph --num-steps 2000

Dynamic binarization of ``shared/data/mnist.npz`` by default (DisARM's setup:
train = first 50000 training images, test = the 10000 test images; the test
figures use one fixed binarization drawn with ``--test-seed``).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample

sys.path.insert(0, str(Path(__file__).resolve().parent))
# An installed pyro_binary_grads wins; otherwise use the checkout this file is in.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from data import add_data_argument, centring_offset, load_mnist, output_bias_init  # noqa: E402

ESTIMATORS = ("disarm", "arm", "tracegraph")


class SBN(nn.Module):
    """Parameters of the linear one-layer SBN: prior logits, decoder, encoder."""

    def __init__(self, x_dim=784, hidden=200, output_bias=None, input_mean=None):
        super().__init__()
        self.hidden = hidden
        self.prior_logits = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Linear(hidden, x_dim)
        self.encoder = nn.Linear(x_dim, hidden)
        if output_bias is not None:
            with torch.no_grad():
                self.decoder.bias.copy_(torch.as_tensor(output_bias))
        centre = torch.zeros(x_dim) if input_mean is None else torch.as_tensor(input_mean)
        self.register_buffer("input_mean", centre.clone().float())

    def encoder_logits(self, x):
        return self.encoder(x - self.input_mean)


def make_model_and_guide(net, name="sbn"):
    """
    Pyro model and guide of the SBN ``net``; both take ``(x, idx, num_data)``.
    ``name`` is the ``pyro.module`` name (distinct names let several SBNs share
    Pyro's global param store, as in the benchmarks).
    """

    def model(x, idx, num_data):
        pyro.module(name, net)
        with pyro.plate("data", num_data, subsample=idx):
            b = pyro.sample("b", dist.Bernoulli(logits=net.prior_logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net.decoder(b)).to_event(1), obs=x)

    def guide(x, idx, num_data):
        pyro.module(name, net)
        with pyro.plate("data", num_data, subsample=idx):
            pyro.sample("b", dist.Bernoulli(logits=net.encoder_logits(x)).to_event(1))

    return model, guide


def make_elbo(estimator, num_particles=1):
    """The ELBO object for ``--estimator`` (max_plate_nesting=1: the data plate)."""
    if estimator == "tracegraph":
        return pyro.infer.TraceGraph_ELBO(num_particles=num_particles, max_plate_nesting=1)
    try:
        from pyro_binary_grads import ARM_ELBO, DisARM_ELBO
    except ImportError as e:
        raise SystemExit(
            f"--estimator {estimator}: pyro_binary_grads.DisARM_ELBO / ARM_ELBO are not "
            f"available in this checkout ({e}); use --estimator tracegraph"
        )
    cls = {"disarm": DisARM_ELBO, "arm": ARM_ELBO}[estimator]
    return cls(num_particles=num_particles, max_plate_nesting=1)


@torch.no_grad()
def per_example_bound(model, guide, x, num_samples=1, chunk=None):
    """
    Per-example ``num_samples``-sample importance-weighted bound
    ``log mean_k p(x, b_k) / q(b_k | x)`` (``num_samples=1``: a one-sample ELBO),
    computed from vectorized Pyro traces of ``guide`` and ``model``.
    Returns a tensor of shape ``(len(x),)``.
    """
    chunk = chunk or max(1, 50_000 // max(num_samples, 1))
    out = []
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk]
        idx = torch.arange(len(xs), device=x.device)
        with pyro.plate("samples", num_samples, dim=-2):
            gtr = poutine.trace(guide).get_trace(xs, idx, len(xs))
            mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(xs, idx, len(xs))
        f = 0.0
        for tr, sign in ((mtr, 1.0), (gtr, -1.0)):
            tr.compute_log_prob()
            for site in tr.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    f = f + sign * site["unscaled_log_prob"]
        f = f.expand(num_samples, len(xs))
        out.append(torch.logsumexp(f, 0) - math.log(num_samples))
    return torch.cat(out)


def save_plot(path, history, tests, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h[0] for h in history])
    elbo = np.array([h[1] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, elbo, color="0.8", lw=0.5, label="train ELBO (minibatch)")
    w = min(100, len(elbo))
    if w > 1:
        smooth = np.convolve(elbo, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="C0", label=f"train ELBO ({w}-step mean)")
    if tests:
        ts = np.array(tests)
        ax.plot(ts[:, 0], ts[:, 1], "o-", color="C1", label="test ELBO (1 sample)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per example")
    lo = np.percentile(elbo, 2) if len(elbo) > 10 else elbo.min()
    ax.set_ylim(lo - 5, max(elbo.max(), *(t[1] for t in tests)) + 5 if tests else elbo.max() + 5)
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="pyro", help="only 'pyro' for now")
    p.add_argument("--estimator", choices=ESTIMATORS, default="disarm")
    p.add_argument("--num-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (DisARM's paper: 1e-4 over 1e6 steps; "
                        "1e-3 suits short runs)")
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--num-particles", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    add_data_argument(p)
    p.add_argument("--out", type=Path, default=Path("out/sbn"))
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--test-size", type=int, default=1000,
                   help="test examples used for the periodic and final test figures")
    p.add_argument("--test-seed", type=int, default=0,
                   help="seed of the fixed test binarization (dynamic binarization)")
    p.add_argument("--final-test-samples", type=int, default=100,
                   help="K of the final K-sample test bound (0: skip)")
    p.add_argument("--no-center", action="store_true", help="do not centre the encoder input")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: at batch 50 a second thread gains "
                        "little, and on a busy machine intra-op threads can be several times "
                        "slower; 0 keeps torch's default)")
    p.add_argument("--validation", action="store_true",
                   help="keep Pyro's distribution validation on (about 20%% slower)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.backend != "pyro":
        p.error(f"--backend {args.backend!r} is not supported yet (only 'pyro'; "
                "the NumPyro version of this example comes later)")
    return args


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.enable_validation(args.validation)
    pyro.clear_param_store()
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)

    train = load_mnist(args.data, args.binarize, "train")
    test = load_mnist(args.data, args.binarize, "test")
    x_test = torch.as_tensor(test.fixed_binarization(args.test_size, args.test_seed), device=device)
    net = SBN(
        train.dim,
        args.hidden,
        output_bias=output_bias_init(train),
        input_mean=None if args.no_center else centring_offset(train),
    ).to(device)
    model, guide = make_model_and_guide(net)
    elbo = make_elbo(args.estimator, args.num_particles)
    optim = pyro.optim.Adam({"lr": args.lr, "betas": (0.9, args.beta2)})
    svi = pyro.infer.SVI(model, guide, optim, elbo)
    num_data = len(train)

    def test_elbo(k=1):
        return per_example_bound(model, guide, x_test, k).mean().item()

    args.out.mkdir(parents=True, exist_ok=True)
    history, tests = [], []
    t0 = time.perf_counter()
    train_time = 0.0
    bar = tqdm(
        train.batches(args.batch_size, rng, args.num_steps),
        total=args.num_steps,
        disable=args.no_progress,
        file=sys.stderr,
        desc=f"{args.estimator}",
    )
    running = None
    tests.append((0, test_elbo()))
    for step, (idx, xb) in enumerate(bar, 1):
        ts = time.perf_counter()
        x = torch.as_tensor(xb, device=device)
        idx = torch.as_tensor(idx, device=device)
        loss = svi.step(x, idx, num_data)
        train_time += time.perf_counter() - ts
        e = -loss / num_data
        if not math.isfinite(e):
            raise FloatingPointError(f"non-finite loss at step {step}: {loss}")
        history.append((step, e))
        running = e if running is None else 0.99 * running + 0.01 * e
        if step % args.eval_every == 0 or step == args.num_steps:
            tests.append((step, test_elbo()))
            bar.set_postfix(train=f"{running:.2f}", test=f"{tests[-1][1]:.2f}")
        elif step % 20 == 0:
            bar.set_postfix(train=f"{running:.2f}", test=f"{tests[-1][1]:.2f}" if tests else "-")
    bar.close()

    final_bound = None
    if args.final_test_samples > 0:
        final_bound = test_elbo(args.final_test_samples)
    wall = time.perf_counter() - t0
    last = [h[1] for h in history[-min(500, len(history)):]]
    plot = args.out / f"sbn_{args.estimator}.png"
    save_plot(plot, history, tests,
              f"SBN {train.dim}-{args.hidden}, {args.estimator}, batch {args.batch_size}, lr {args.lr:g}")
    result = {
        "example": "sbn",
        "backend": args.backend,
        "estimator": args.estimator,
        "steps": args.num_steps,
        "batch_size": args.batch_size,
        "hidden": args.hidden,
        "lr": args.lr,
        "seed": args.seed,
        "data": str(args.data),
        "binarize": args.binarize,
        "train_elbo_last500_mean": float(np.mean(last)),
        "test_elbo_1sample": tests[-1][1] if tests else None,
        f"test_bound_{args.final_test_samples}sample": final_bound,
        "test_size": len(x_test),
        "test_seed": args.test_seed,
        "ms_per_step": 1000 * train_time / max(1, len(history)),
        "wall_time_s": wall,
        "threads": torch.get_num_threads(),
        "plot": str(plot),
    }
    with open(args.out / f"sbn_{args.estimator}.json", "w") as fh:
        json.dump({**result, "history": history, "tests": tests}, fh)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
