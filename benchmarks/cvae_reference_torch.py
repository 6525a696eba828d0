"""
A second reference for the ReinMax-harness rows of ``RESULTS.md``: the authors'
training loop, written in PyTorch (no Pyro, no plugin), to tell a gap to the
released ReinMax-CV means that comes from the framework and harness (JAX,
our data order and initialisation, our one-sample KL) from one that comes
from the estimator.

It follows ``danielwang0452/ReinMax_ASC`` (``run_reinmax_cv.py``,
``experiments.py``, ``mnist_vae/model/vae.py``; read, not copied): torch's
default ``nn.Linear`` initialisation under ``torch.manual_seed(seed)``, a
shuffling ``DataLoader`` over all 60,000 grey training images (values / 255,
as ``transforms.ToTensor``), batch 100, ``torch.optim.Adam`` / ``RAdam`` with
their defaults, 160 epochs, encoder 784-512-256-(L*C) and decoder
(L*C)-256-512-784 with ReLU and a sigmoid output, the loss
``binary_cross_entropy(sigmoid, x, sum) / B + KL`` with the closed-form KL to
the uniform prior on ``q + 1e-10``; reported as the authors report: the
running mean of the loss over the last epoch (train -ELBO) and one pass over
the test set (test -ELBO, one sample, analytic KL).

The estimator is the backward pass of a ``torch.autograd.Function`` (forward:
the Gumbel-max sample :math:`D` and :math:`\\pi = \\mathrm{softmax}(\\alpha)`),
with upstream gradients :math:`g = \\partial f/\\partial D` and
:math:`g_\\pi = \\partial f/\\partial\\pi` (the analytic KL's) and
:math:`J(p)v = p\\odot v - p\\,(p^\\top v)`:

* ``reinmax`` (Liu et al. 2023, Alg. 2): :math:`2J(\\pi_{1/2})g + J(\\pi)(g_\\pi - \\tfrac12 g)`,
  :math:`\\pi_{1/2} = \\tfrac12(\\mathrm{softmax}(\\alpha/\\tau) + D)`;
* ``reinmax_cv`` (Wang & Bui, the form of ``docs/estimators/reinmax_cv.rst``):
  ReinMax at :math:`\\tau = 1`, plus
  :math:`\\eta\\big(\\tfrac1K\\sum_k \\tfrac1\\tau J(\\mathrm{softmax}(\\tilde z_k/\\tau))
  - \\tfrac1\\tau J(\\mathrm{softmax}(\\theta_D + S))\\big)g` with
  :math:`\\theta_D = \\log\\tfrac12(\\pi + D)`, :math:`\\tilde z_k \\sim (\\theta_D + G'
  \\mid \\arg\\max = D)` (REBAR App. C) and :math:`S = \\mathrm{softmax}((\\alpha + G)/\\tau)`
  the forward soft sample; K = ``--rao-samples`` (100).

    python benchmarks/cvae_reference_torch.py --latent 8x4 --estimator reinmax_cv
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import categorical_vae  # noqa: E402  (its TUNED table)
import common  # noqa: E402
from data import DATA_DIR  # noqa: E402


def jvp_softmax(p, v):
    """:math:`J(p)v` over the last axis."""
    return p * v - p * (p * v).sum(-1, keepdim=True)


def conditional_gumbel_logits(theta, D, E):
    """:math:`\\theta + G' \\mid \\arg\\max = D` from ``E`` ~ Exp(1) of shape
    (K,) + theta.shape (REBAR App. C)."""
    logZ = theta.logsumexp(-1, keepdim=True)
    E_top = (E * D).sum(-1, keepdim=True)
    top = logZ - E_top.log()
    rest = -(E * (-theta).exp() + E_top * (-logZ).exp()).log()
    return torch.where(D > 0, top, rest)


def estimate(alpha, D, S, g, g_pi, cfg, E=None):
    """:math:`\\partial f/\\partial\\alpha` estimated from the upstream gradients
    (``g`` at D, ``g_pi`` at pi), the forward soft sample ``S`` and, for ReinMax-CV,
    the Gumbel-Rao draws' exponentials ``E`` (drawn here when None)."""
    tau, pi = cfg["tau"], alpha.softmax(-1)
    tau_rm = cfg.get("tau_reinmax") or (1.0 if cfg["estimator"] == "reinmax_cv" else tau)
    tau2 = cfg.get("tau2") or tau  # the Gumbel-Rao and Gumbel-softmax temperature
    half = 0.5 * ((alpha / tau_rm).softmax(-1) + D)
    grad = 2 * jvp_softmax(half, g) + jvp_softmax(pi, g_pi - 0.5 * g)
    if cfg["estimator"] == "reinmax_cv":
        theta = (0.5 * (pi + D)).log()
        if E is None:
            E = torch.empty((cfg["K"],) + theta.shape, dtype=theta.dtype).exponential_()
        z = conditional_gumbel_logits(theta, D, E)
        gr = jvp_softmax((z / tau2).softmax(-1), g.unsqueeze(0)).mean(0) / tau2
        gs = jvp_softmax((theta + S).softmax(-1), g) / tau2
        grad = grad + cfg["eta"] * (gr - gs)
    return grad


class CategoricalST(torch.autograd.Function):
    """Forward: ``(D, softmax(alpha))``; backward: :func:`estimate`."""

    @staticmethod
    def forward(ctx, alpha, cfg):
        G = -torch.empty_like(alpha).exponential_().log()
        S = ((alpha + G) / cfg["tau"]).softmax(-1)
        D = F.one_hot(S.argmax(-1), alpha.shape[-1]).to(alpha.dtype)
        ctx.save_for_backward(alpha, D, S)
        ctx.cfg = cfg
        return D, alpha.softmax(-1)

    @staticmethod
    def backward(ctx, g, g_pi):
        alpha, D, S = ctx.saved_tensors
        return estimate(alpha, D, S, g, g_pi, ctx.cfg), None


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, L, C):
        super().__init__()
        self.L, self.C = L, C
        self.encoder = mlp((784, 512, 256, L * C))
        self.decoder = mlp((L * C, 256, 512, 784))

    def forward(self, x, cfg):
        """(BCE, KL), each the minibatch mean, as ``VAE.forward_approx``."""
        alpha = self.encoder(x).view(-1, self.L, self.C)
        D, q = CategoricalST.apply(alpha, cfg)
        recon = self.decoder(D.view(len(x), -1)).sigmoid()
        bce = F.binary_cross_entropy(recon, x, reduction="sum") / len(x)
        q = q.view(len(x), -1)
        kl = (q * (q + 1e-10).log()).sum(-1).mean() + math.log(self.C) * self.L
        return bce, kl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", default="8x4")
    p.add_argument("--estimator", choices=("reinmax", "reinmax_cv"), default="reinmax_cv")
    p.add_argument("--epochs", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--optim", choices=("adam", "radam"), default=None)
    p.add_argument("--rao-samples", type=int, default=100)
    p.add_argument("--tau2", type=float, default=None,
                   help="ReinMax-CV's Gumbel-Rao / Gumbel-softmax temperature (default: "
                        "--temperature, as the authors' latest reinmax_jacobians.py; one stored "
                        "version hard-codes 0.5)")
    p.add_argument("--reinmax-temperature", type=float, default=None,
                   help="ReinMax-CV's ReinMax temperature (default 1, as the latest version; "
                        "the 0.5 version uses --temperature)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--data", type=Path, default=DATA_DIR / "mnist.npz")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "cvae_reference_torch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--backend", default="torch", help="ignored (for reproduce.py)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="ignored unless given: epochs = ceil(steps / epoch length)")
    p.add_argument("--eval-every", type=int, default=None, help="ignored (for reproduce.py)")
    p.add_argument("--eval-size", type=int, default=None, help="ignored (for reproduce.py)")
    args = p.parse_args(argv)
    args.C, args.L = (int(s) for s in args.latent.lower().split("x"))
    lr, tau, optim, eta = categorical_vae.tuned(args.latent, args.estimator)
    args.lr = lr if args.lr is None else args.lr
    args.temperature = tau if args.temperature is None else args.temperature
    args.optim = optim if args.optim is None else args.optim
    args.eta = (eta or 0.0) if args.eta is None else args.eta
    if args.num_steps is not None:
        args.epochs = -(-args.num_steps * args.batch_size // 60000)
    return args


def main(argv=None):
    args = parse_args(argv)
    tag = f"_tau2_{args.tau2:g}" if args.tau2 else ""
    name = f"cvae_reference_torch_{args.latent}_{args.estimator}{tag}_s{args.seed}"
    common.check_outputs(args, name)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with np.load(args.data) as d:
        x_train = torch.tensor(d["x_train"], dtype=torch.float32) / 255
        x_test = torch.tensor(d["x_test"], dtype=torch.float32) / 255
    loader = torch.utils.data.DataLoader(x_train, batch_size=args.batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(x_test, batch_size=args.batch_size, shuffle=True)
    model = VAE(args.L, args.C)
    opt = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[args.optim](
        model.parameters(), lr=args.lr)
    cfg = {"estimator": args.estimator, "tau": args.temperature, "eta": args.eta,
           "K": args.rao_samples, "tau2": args.tau2, "tau_reinmax": args.reinmax_temperature}
    curve, history, tests, train_time = [], [], [], 0.0
    for epoch in range(1, args.epochs + 1):
        total, t = 0.0, time.perf_counter()
        for x in loader:
            bce, kl = model(x, cfg)
            loss = bce + kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
            history.append((len(history) + 1, -loss.item()))
        train_time += time.perf_counter() - t
        with torch.no_grad():
            test = sum(float(sum(model(x, cfg))) * len(x) for x in test_loader) / len(x_test)
        curve.append((epoch, total / len(x_train), test))
        tests.append((len(history), -test))
        if not args.no_progress:
            print(f"epoch {epoch}: train {curve[-1][1]:.2f} test {test:.2f}",
                  file=sys.stderr, flush=True)
    steps = len(history)
    result = {
        "example": "cvae_reference_torch", "backend": "torch (hand-written, the authors' loop)",
        "latent": args.latent, "estimator": args.estimator, "kl": "analytic",
        "steps": steps, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "optim": args.optim, "temperature": args.temperature,
        "eta": args.eta if args.estimator == "reinmax_cv" else None,
        "cv_form": "authors" if args.estimator == "reinmax_cv" else None,
        "rao_samples": args.rao_samples if args.estimator == "reinmax_cv" else None,
        "tau2": args.tau2, "reinmax_temperature": args.reinmax_temperature,
        "seed": args.seed, "data": str(args.data), "targets": "grey/255",
        # the authors' figures: -(last epoch's running loss), -(one test pass)
        "train_objective_last_epoch": -curve[-1][1], "test_elbo": -curve[-1][2],
        "test_size": len(x_test), "ms_per_step": 1000 * train_time / max(1, steps),
        "wall_time_s": time.perf_counter() - t0, "plot": str(args.out / f"{name}.png"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    common.save_plot(args.out / f"{name}.png", history, tests,
                     f"PyTorch, the authors' loop: {args.estimator}, {args.latent}",
                     "test ELBO (one sample, analytic KL, full test set)")
    return common.finish(args, name, result, history, tests)


if __name__ == "__main__":
    main()
