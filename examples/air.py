"""
A small Attend-Infer-Repeat (AIR, Eslami et al., NIPS 2016) in Pyro, after
pyro-ppl's ``examples/air``, trained with this package's estimators
*unchanged*: the same model and guide that ``TraceGraph_ELBO`` trains.

Data: 0, 1 or 2 MNIST digits, downscaled to 10x10, pasted at random
positions on a 24x24 canvas (built in code from ``shared/data/mnist.npz``).

Model (per image, ``num_steps`` = 2 steps, ``t = 0, 1``)::

    z_pres_t ~ Bernoulli(0.5 * z_pres_{t-1})            (to_event(1), shape (n, 1))
    z_where_t ~ Normal(prior) masked by z_pres_t       (scale, x, y)
    z_what_t ~ Normal(0, 1) masked by z_pres_t
    x ~ Normal(sum_t z_pres_t * window_to_image(z_where_t, decode(z_what_t)), 0.3)

Guide: an LSTM over the steps reads the flattened image (``.view(n, -1)``,
as in Pyro's AIR) and predicts ``z_pres_t`` (Bernoulli, the discrete sites),
``z_where_t``; an encoder reads the attention window for ``z_what_t``.

The program flattens with ``.view(n, -1)`` and so does not broadcast over the
evaluation dim of the one-pass vectorized path: ``DisARM_ELBO()``,
``RLOO_ELBO(num_samples=2)`` and ``VIMCO(num_samples=2)`` detect this on the
first step, warn once, and train it on the sequential path (an exact
gradient, one guide and model run per evaluation).

Usage::

    python examples/air.py --steps 2000 --estimators disarm rloo vimco tracegraph
    python examples/air.py --steps 20 --estimators disarm      # smoke run

The recorded run (``results/air/air.json``, ``docs/results/air.png``):
``nice python examples/air.py --steps 2500 --threads 1 --out results/air`` on
a loaded 2-core CPU, held-out ELBO / count accuracy at step 2500 and CPU
ms per step: DisARM 124.6 / 0.90 / 27, RLOO(2) 124.3 / 0.80 / 17, VIMCO(2)
125.8 / 0.84 / 20, TraceGraph_ELBO 122.2 / 0.72 / 26 (one seed).

Writes ``out/air/air.json`` (per estimator: the training objective of every
step, held-out ELBO and count accuracy every ``--eval-every`` steps, wall and
CPU seconds) and ``out/air/air.png`` when matplotlib is available.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.optim import Adam

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pyro_binary_grads import VIMCO, DisARM_ELBO, RLOO_ELBO  # noqa: E402

CANVAS, DIGIT = 24, 10


def multi_digit_data(num_images, seed=0, path=None):
    """``num_images`` canvases of 0-2 MNIST digits and their digit counts."""
    path = path or ROOT.parent / "shared" / "data" / "mnist.npz"
    with np.load(path) as f:
        digits = torch.as_tensor(f["x_train"][:5000], dtype=torch.float32) / 255.0
    digits = F.interpolate(digits.reshape(-1, 1, 28, 28), size=(DIGIT, DIGIT),
                           mode="bilinear", align_corners=False)[:, 0]
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(num_images, CANVAS, CANVAS)
    counts = torch.randint(0, 3, (num_images,), generator=g)
    for i in range(num_images):
        for _ in range(int(counts[i])):
            d = digits[torch.randint(0, len(digits), (), generator=g)]
            r, c = torch.randint(0, CANVAS - DIGIT + 1, (2,), generator=g).tolist()
            x[i, r:r + DIGIT, c:c + DIGIT] = torch.clamp(x[i, r:r + DIGIT, c:c + DIGIT] + d, 0, 1)
    return x, counts


def _theta(z_where, inverse):
    """Affine matrices of windows ``z_where = (scale, x, y)`` (as Pyro's AIR)."""
    s, xy = z_where[:, :1], z_where[:, 1:]
    if inverse:
        s, xy = 1 / s, -xy / s
    zero = torch.zeros_like(s)
    return torch.cat([s, zero, xy[:, :1], zero, s, xy[:, 1:]], 1).view(-1, 2, 3)


def window_to_image(z_where, window):
    n = window.size(0)
    grid = F.affine_grid(_theta(z_where, False), (n, 1, CANVAS, CANVAS), align_corners=False)
    return F.grid_sample(window.view(n, 1, DIGIT, DIGIT), grid, align_corners=False).view(n, CANVAS, CANVAS)


def image_to_window(z_where, images):
    n = images.size(0)
    grid = F.affine_grid(_theta(z_where, True), (n, 1, DIGIT, DIGIT), align_corners=False)
    return F.grid_sample(images.view(n, 1, CANVAS, CANVAS), grid, align_corners=False).view(n, -1)


class AIR(nn.Module):
    def __init__(self, num_steps=2, z_what=10, hidden=64):
        super().__init__()
        self.num_steps, self.z_what = num_steps, z_what
        self.decoder = nn.Sequential(nn.Linear(z_what, 100), nn.ReLU(), nn.Linear(100, DIGIT ** 2))
        self.encoder = nn.Sequential(nn.Linear(DIGIT ** 2, 100), nn.ReLU(), nn.Linear(100, 2 * z_what))
        self.rnn = nn.LSTMCell(CANVAS ** 2 + 3 + z_what + 1, hidden)
        self.predict = nn.Linear(hidden, 1 + 3 + 3)
        self.register_buffer("where_loc", torch.tensor([3.0, 0.0, 0.0]))
        self.register_buffer("where_scale", torch.tensor([0.2, 1.0, 1.0]))

    def model(self, data):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", data.size(0)):
            n = data.size(0)
            x = torch.zeros(n, CANVAS, CANVAS)
            z_pres = torch.ones(n, 1)
            for t in range(self.num_steps):
                z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.5 * z_pres).to_event(1))
                mask = z_pres > 0
                z_where = pyro.sample(
                    f"z_where_{t}", dist.Normal(self.where_loc.expand(n, 3),
                                                self.where_scale.expand(n, 3))
                    .mask(mask).to_event(1))
                z_what = pyro.sample(
                    f"z_what_{t}", dist.Normal(torch.zeros(n, self.z_what), 1.0)
                    .mask(mask).to_event(1))
                window = torch.sigmoid(self.decoder(z_what))
                x = x + z_pres.view(-1, 1, 1) * window_to_image(z_where, window)
            pyro.sample("obs", dist.Normal(x.view(n, -1), 0.3).to_event(1),
                        obs=data.view(n, -1))

    def guide(self, data):
        pyro.module("encoder", self.encoder)
        pyro.module("rnn", self.rnn)
        pyro.module("predict", self.predict)
        with pyro.plate("data", data.size(0)):
            n = data.size(0)
            flat = data.view(n, -1)
            h = c = torch.zeros(n, self.rnn.hidden_size)
            z_pres = torch.ones(n, 1)
            z_where = self.where_loc.expand(n, 3)
            z_what = torch.zeros(n, self.z_what)
            for t in range(self.num_steps):
                h, c = self.rnn(torch.cat([flat, z_where, z_what, z_pres], 1), (h, c))
                out = self.predict(h)
                p = torch.sigmoid(out[:, :1]).clamp(1e-4, 1 - 1e-4)
                z_pres = pyro.sample(f"z_pres_{t}", dist.Bernoulli(p * z_pres).to_event(1))
                mask = z_pres > 0
                z_where = pyro.sample(
                    f"z_where_{t}", dist.Normal(self.where_loc + out[:, 1:4],
                                                self.where_scale * F.softplus(out[:, 4:7]) + 1e-3)
                    .mask(mask).to_event(1))
                stats = self.encoder(image_to_window(z_where, data))
                z_what = pyro.sample(
                    f"z_what_{t}", dist.Normal(stats[:, :self.z_what],
                                               F.softplus(stats[:, self.z_what:]) + 1e-3)
                    .mask(mask).to_event(1))


ESTIMATORS = {
    "disarm": lambda: DisARM_ELBO(),
    "rloo": lambda: RLOO_ELBO(num_samples=2),
    "vimco": lambda: VIMCO(num_samples=2),
    "tracegraph": lambda: TraceGraph_ELBO(),
}


def evaluate(air, images, counts, num_particles=4):
    """The ELBO (``Trace_ELBO``, nats per image: the same objective for every
    estimator; VIMCO's training value is its K-sample bound) and the count
    accuracy (AIR's metric: the guide's ``sum_t z_pres_t`` equals the number
    of digits) on held-out images."""
    with torch.no_grad():
        elbo = -Trace_ELBO(num_particles=num_particles).loss(air.model, air.guide, images)
        trace = poutine.trace(air.guide).get_trace(images)
        found = sum(trace.nodes[f"z_pres_{t}"]["value"][:, 0] for t in range(air.num_steps))
    return elbo / len(images), (found == counts.to(found.dtype)).double().mean().item()


def train(name, data, steps, held_out=None, eval_every=100, batch_size=32, lr=1e-3, seed=0):
    """Returns the per-step training objective (nats per image), the
    held-out evaluations ``(step, ELBO, count accuracy)``, wall and CPU
    seconds of the training steps (evaluations excluded)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    air = AIR()
    svi = SVI(air.model, air.guide, Adam({"lr": lr}), ESTIMATORS[name]())
    g = torch.Generator().manual_seed(seed)
    losses, evals, wall, cpu = [], [], 0.0, 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not broadcast")
        for step in range(steps):
            idx = torch.randint(0, len(data), (batch_size,), generator=g)
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(-svi.step(data[idx]) / batch_size)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if held_out is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                evals.append((step + 1, *evaluate(air, *held_out)))
    return losses, evals, wall, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--out", type=Path, default=Path("out/air"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default 0: torch's choice)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between held-out evaluations (ELBO, count accuracy)")
    p.add_argument("--num-eval", type=int, default=256, help="held-out images")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    data, _ = multi_digit_data(args.num_images)
    held_out = multi_digit_data(args.num_eval, seed=1)
    report = {"config": {"steps": args.steps, "num_images": args.num_images,
                         "num_eval": args.num_eval, "eval_every": args.eval_every,
                         "batch_size": 32, "lr": 1e-3, "threads": torch.get_num_threads()}}
    for name in args.estimators:
        losses, evals, wall, cpu = train(name, data, args.steps, held_out, args.eval_every)
        tail = losses[-max(1, len(losses) // 10):]
        report[name] = {"train_objective_last_tenth": float(np.mean(tail)), "seconds": wall,
                        "cpu_seconds": cpu, "train_objective": losses,
                        "eval": [{"step": s, "elbo": e, "count_accuracy": a}
                                 for s, e, a in evals]}
        last = evals[-1] if evals else (None, float("nan"), float("nan"))
        print(f"{name:10s} train objective (last tenth) {np.mean(tail):8.2f}  held-out ELBO "
              f"{last[1]:8.2f} nats/image  count acc. {last[2]:.3f}  "
              f"{wall / args.steps * 1e3:6.1f} ms/step wall, {cpu / args.steps * 1e3:6.1f} CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "air.json").write_text(json.dumps(report))
    plot(report, args.out / "air.png")
    return report


def plot(report, path):
    """The training objective, held-out ELBO and count accuracy per step
    (skipped when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in report.items():
        if name == "config":
            continue
        e = np.asarray(r["train_objective"])
        k = max(1, len(e) // 50)
        axes[0].plot(np.convolve(e, np.ones(k) / k, mode="valid"), label=name)
        steps = [v["step"] for v in r["eval"]]
        axes[1].plot(steps, [v["elbo"] for v in r["eval"]], label=name)
        axes[2].plot(steps, [v["count_accuracy"] for v in r["eval"]], label=name)
    num_eval = report.get("config", {}).get("num_eval", "")
    axes[0].set_title("training objective (VIMCO: its K = 2 bound)")
    axes[1].set_title(f"held-out ELBO (Trace_ELBO, {num_eval} images)")
    axes[2].set_title("held-out count accuracy")
    axes[0].set_ylabel("nats / image")
    axes[1].set_ylabel("nats / image")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot-only"]:  # python examples/air.py --plot-only air.json out.png
        plot(json.loads(Path(sys.argv[2]).read_text()), sys.argv[3])
    else:
        main()
