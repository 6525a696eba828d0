"""
Cost of each evaluation path of ``DisARM_ELBO`` on the linear SBN 784-200
(batch 50, random binary data, CPU): the one-pass vectorized path (the
default for programs that broadcast), the sequential path (``vectorize=False``,
taken for programs that do not), and the same SBN written so that it does
not broadcast (``torch.mm``), which the default constructor detects and runs
sequentially. ms per ``SVI.step``, median of blocks, interleaved.

    python benchmarks/bench_pyro_paths.py --steps 300
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI
from pyro.optim import Adam

sys.path.append(str(Path(__file__).resolve().parents[1]))
from pyro_binary_grads import DisARM_ELBO  # noqa: E402


def sbn(name, mm):
    enc, dec = torch.nn.Linear(784, 200), torch.nn.Linear(200, 784)
    prior = torch.nn.Parameter(torch.zeros(200))

    def model(x):
        pyro.module(f"{name}_dec", dec)
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=prior).to_event(1))
            logits = torch.mm(b, dec.weight.t()) + dec.bias if mm else dec(b)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        pyro.module(f"{name}_enc", enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=enc(x)).to_event(1))

    return model, guide


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--block", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    x = (torch.rand(50, 784) < 0.3).float()
    trainers = {}
    for label, mm, vectorize in [("vectorized", False, True), ("sequential", False, False),
                                 ("torch.mm, detected", True, True)]:
        model, guide = sbn(label, mm)
        trainers[label] = SVI(model, guide, Adam({"lr": 1e-3}), DisARM_ELBO(vectorize=vectorize))
    times = {k: [] for k in trainers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for svi in trainers.values():
            svi.step(x)
        for _ in range(args.steps // args.block):
            for label, svi in trainers.items():
                t = time.perf_counter()
                for _ in range(args.block):
                    svi.step(x)
                times[label].append((time.perf_counter() - t) / args.block * 1e3)
    base = statistics.median(times["vectorized"])
    for label, ts in times.items():
        m = statistics.median(ts)
        print(f"{label:22s} {m:7.2f} ms/step  ({m / base:.2f}x the vectorized path)")


if __name__ == "__main__":
    main()
