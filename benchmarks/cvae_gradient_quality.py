"""
Gradient quality of the categorical estimators on the categorical VAE of
``examples/categorical_vae.py`` (the ReinMax MNIST-VAE harness, latent ``8x4``:
L = 4 one-hot variables of C = 8 categories): squared bias, variance and MSE of
the encoder-gradient estimate against the exact gradient, for ST,
straight-through Gumbel-softmax, Gumbel-Rao, ReinMax [1], ReinMax-Rao and
ReinMax-CV [2] (as its authors ran it, K = 100, at the example's tuned eta and
at the class default eta = 1, and our earlier ``form=fresh`` with K = 10;
ReinMax also at tau = 1, the temperature of ReinMax-CV's ReinMax term), and the
unbiased DisARM [3], RLOO [4] and TraceGraph_ELBO.

The model is trained with ReinMax (the example's tuned settings for the latent
size) for ``--train-steps`` steps (seed ``--seed``, batch 100, grey-level
targets, as the example). At that fixed parameter point, on one fixed
minibatch of ``--batch-size`` training images (``Dataset.fixed_binarization``
with ``--batch-seed``; for the example's grey-level targets that is the grey
values of a seeded random subset), the exact gradient of the loss that
``elbo.loss_and_grads`` differentiates (the minibatch ELBO scaled by
``num_data / batch``, negated) with respect to the encoder parameters is
computed in float64 by enumerating the C^L configurations of each example's
latent (the examples are independent given the parameters):

    loss = -(num_data / B) sum_b sum_z q(z | x_b) (log p(x_b, z) - log q(z | x_b)),

and is cross-checked (a) against ``pyro_binary_grads.diagnostics.exact_elbo``
(the library's own enumeration, float32, one example at a time) and (b)
against the mean of ``--check-draws`` draws of each unbiased estimator
(DisARM, RLOO with 2 samples): per coordinate ``z = (mean - exact) / se``,
printed as max |z| with the number of |z| > 5 (and > 4) a normal would give,
over the coordinates that are well sampled (DESIGN.md: at least
``--check-min-nonzero`` = 200 nonzero draws; for the output layer also 200
expected draws of the coordinate's category, see :func:`category_probability`;
the coordinates left out are printed apart), and the z of the projections of
the mean error on the exact gradient (whole, and per encoder tensor) and on
two random directions. A failure there is a bug to report, not a tolerance to
widen.

Then each estimator of ``--estimators`` draws ``--draws`` gradients on the same
minibatch and parameters. Reported, summed over the encoder parameters, for the
gradient the optimizer sees (the loss gradient divided by num_data, as the
example's trainer does): squared bias ``|mean - exact|^2 - tr(Var) / draws``
(the correction makes it unbiased), total variance ``tr(Var)``, ``MSE = mean
|g - exact|^2``, the ratios of variance and MSE to ReinMax's, each with a
jackknife standard error over ``--blocks`` blocks of draws, and the ms per draw
(``loss_and_grads`` only). Estimator names are the example's; ``name:key=value``
overrides a setting (``reinmax_cv:eta=1``, ``rloo:num_samples=4``,
``reinmax:temperature=1``, ``reinmax_cv:form=fresh,rao_samples=10``).

    python benchmarks/cvae_gradient_quality.py               # about 4 min on one thread
    python benchmarks/cvae_gradient_quality.py --draws 1000  # RESULTS.md, 5.5 min

[1] Liyuan Liu, Chengyu Dong, Xiaodong Liu, Bin Yu, Jianfeng Gao, "Bridging
    Discrete and Backpropagation: Straight-Through and Beyond", NeurIPS 2023.
[2] Daniel Wang, Thang D. Bui, "Beyond ReinMax: Low-Variance Gradient
    Estimators for Discrete Latent Variables", arXiv:2603.08257, 2026 (methods
    "ReinMax-Rao" and "ReinMax-CV"; formulas as ``pyro_binary_grads/categorical.py``
    and ``docs/estimators/reinmax_cv.rst``).
[3] Zhe Dong, Andriy Mnih, George Tucker, "Coupled Gradient Estimators for
    Discrete Latent Variables", NeurIPS 2021 (categorical DisARM).
[4] Wouter Kool, Herke van Hoof, Max Welling, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!", ICLR 2019 workshop.
"""

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import common  # noqa: E402

common.limit_threads()

import categorical_vae as cvae  # noqa: E402
from data import DATA_DIR, Dataset, load_mnist  # noqa: E402
from pyro_binary_grads.diagnostics import evaluations_per_step  # noqa: E402

#: the example's categorical estimators at its tuned settings, plus ReinMax-CV at
#: the class default eta = 1 and ReinMax at tau = 1 (ReinMax-CV's ReinMax term)
DEFAULT_ESTIMATORS = ["st", "gumbel_st", "gumbel_rao", "reinmax", "reinmax:temperature=1",
                      "reinmax_rao", "reinmax_cv", "reinmax_cv:eta=1",
                      "reinmax_cv:form=fresh,rao_samples=10", "disarm", "rloo", "tracegraph"]
SETTINGS = {"temperature": float, "eta": float, "rao_samples": int, "num_samples": int,
            "form": str}


def parse_spec(spec, latent):
    """``name[:key=value,...]`` -> (name, make_elbo keyword arguments)."""
    name, _, rest = spec.partition(":")
    if name not in common.ESTIMATORS:
        raise SystemExit(f"unknown estimator {name!r}; choose from {sorted(common.ESTIMATORS)}")
    _, temperature, _, eta = cvae.tuned(latent, name)
    kw = {"temperature": temperature, "eta": eta, "rao_samples": None, "num_samples": 2}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise SystemExit(f"{spec}: unknown setting {key!r}; choose from {sorted(SETTINGS)}")
        kw[key] = SETTINGS[key](value)
    return name, kw


def settings_text(name, elbo):
    parts = []
    for attr, label in (("temperature", "tau"), ("eta", "eta"), ("num_samples", "K")):
        if hasattr(elbo, attr) and getattr(elbo, attr) is not None:
            parts.append(f"{label} {getattr(elbo, attr):g}")
    if hasattr(elbo, "form"):
        parts.append(f"form {elbo.form}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# statistics of draws, centred at the exact gradient, in blocks


class Blocks:
    """Per-block sums of ``d = g - exact`` (vector) and of ``|d|^2``."""

    def __init__(self, dim, blocks):
        import torch

        self.S = torch.zeros(blocks, dim, dtype=torch.float64)
        self.Q = torch.zeros(blocks, dtype=torch.float64)
        self.n = np.zeros(blocks)

    def add(self, d, block):
        self.S[block] += d
        self.Q[block] += d @ d
        self.n[block] += 1


class PerCoordinate:
    """Per-coordinate mean and variance of ``d = g - exact`` (Welford), the
    number of draws in which each coordinate of ``g`` is nonzero, and the
    projections of ``d`` on fixed directions (rows of ``directions``)."""

    def __init__(self, dim, directions):
        import torch

        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)
        self.nonzero = torch.zeros(dim, dtype=torch.int64)
        self.directions = directions
        self.proj = []

    def add(self, d, g):
        self.n += 1
        delta = d - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (d - self.mean)
        self.nonzero += g != 0
        self.proj.append((self.directions @ d).tolist())


def _stats(S, Q, N):
    """bias2 (corrected), tr(Var), MSE from the sums of d over N draws."""
    m = S / N
    b2 = float(m @ m)
    tv = (float(Q) - N * b2) / (N - 1)
    return {"bias2": b2 - tv / N, "variance": tv, "mse": float(Q) / N, "bias2_raw": b2}


def block_stats(acc):
    """Full-sample statistics and their delete-one-block jackknife values."""
    S, Q, N = acc.S.sum(0), acc.Q.sum(), acc.n.sum()
    full = _stats(S, Q, N)
    loo = [_stats(S - acc.S[k], Q - acc.Q[k], N - acc.n[k]) for k in range(len(acc.n))]
    return full, loo


def jackknife_se(values):
    v = np.asarray(values, dtype=float)
    k = len(v)
    return float(np.sqrt((k - 1) / k * np.sum((v - v.mean()) ** 2)))


# ---------------------------------------------------------------------------
# the exact gradient


def all_configs(L, C, dtype):
    """(C**L, L, C) one-hot tensor of every configuration."""
    import torch

    idx = torch.tensor(list(itertools.product(range(C), repeat=L)))
    return torch.nn.functional.one_hot(idx, C).to(dtype)


def exact_loss_and_grad(bk, model, guide, x, idx, num_data, enc_names, L, C, chunk=512):
    """
    The exact loss ``-sum_b sum_z q(z|x_b) (sum of scaled model log-probs -
    scaled log q)`` in float64 (params and data cast, via ``poutine.substitute``)
    and its gradient w.r.t. the encoder parameters (a flat float64 vector). The
    model's log-probs do not depend on the encoder: they are computed without
    gradient, in chunks of configurations.
    """
    import torch
    import pyro.poutine as poutine

    dp = {k: bk.pyro.param(k).detach().double().requires_grad_(k in enc_names)
          for k in bk.names}
    xd = torch.as_tensor(x, dtype=torch.float64)
    Z = all_configs(L, C, torch.float64)  # (K, L, C)
    gtr = poutine.trace(poutine.substitute(guide, data=dp)).get_trace(xd, idx, num_data)
    zsite = gtr.nodes["z"]
    log_q = zsite["fn"].log_prob(Z[:, None])  # (K, B)
    scale_q = zsite["scale"]
    logp = []
    with torch.no_grad():
        for s in range(0, len(Z), chunk):
            zc = Z[s : s + chunk, None]
            cond = poutine.condition(poutine.substitute(model, data=dp), data={"z": zc})
            mtr = poutine.trace(cond).get_trace(xd, idx, num_data)
            lp = 0.0
            for site in mtr.nodes.values():
                if site["type"] == "sample":
                    lp = lp + site["scale"] * site["fn"].log_prob(site["value"])
            logp.append(lp.expand(len(zc), len(x)))
    logp = torch.cat(logp)  # (K, B), scaled
    q = torch.exp(log_q)
    elbo = (q * (logp - scale_q * log_q)).sum()
    # the site's (normalized) logits, to get the per-example logit gradient
    base = zsite["fn"]
    while hasattr(base, "base_dist"):
        base = base.base_dist
    leaves = [dp[k] for k in enc_names]
    *grads, d_norm = torch.autograd.grad(-elbo, leaves + [base.logits])
    # logits_norm = a - logsumexp(a): d loss / d a = d_norm - softmax(a) * sum(d_norm)
    d_logits = d_norm - torch.softmax(base.logits.detach(), -1) * d_norm.sum(-1, keepdim=True)
    return {"loss": -float(elbo.detach()), "grad": torch.cat([g.reshape(-1) for g in grads]),
            "logit_grad": d_logits.reshape(len(x), L * C),
            "q_sum_max_err": float((q.detach().sum(0) - 1).abs().max())}


def library_exact(bk, model, guide, x, num_data, enc_names, enc_leaves):
    """``pyro_binary_grads.diagnostics.exact_elbo`` one example at a time
    (float32), rescaled to the minibatch loss; (loss, flat encoder gradient)."""
    import torch
    from pyro_binary_grads.diagnostics import exact_elbo

    B = len(x)
    loss, grad = 0.0, None
    for b in range(B):
        e = exact_elbo(model, guide, torch.as_tensor(x[b : b + 1]),
                       torch.as_tensor(np.array([b])), num_data)
        # subsample of one: scale num_data / 1; the minibatch's is num_data / B
        g = torch.autograd.grad(-e / B, enc_leaves)
        g = torch.cat([v.reshape(-1) for v in g]).double()
        loss += -float(e.detach()) / B
        grad = g if grad is None else grad + g
    return loss, grad


def category_probability(bk, x, enc_names, enc_sizes, L, C, logit_grad, share=0.01):
    """
    Per encoder coordinate, the probability of the rare event that carries its
    gradient, for the per-coordinate test's sampling rule: for the output
    layer (``enc2_W[h, j]``, ``enc2_b[j]``, logit ``j`` = variable ``l = j // C``,
    category ``c = j % C``) the smallest ``min(q_bc, 1 - q_bc)``,
    ``q_bc = q(z_l = c | x_b)``, over the examples ``b`` that carry at least
    ``share`` of the coordinate's exact gradient (``|h_b * d loss / d logit_bj|``
    over its sum, from the exact per-example logit gradient ``logit_grad``); 1
    for the other layers (their gradients mix every logit). A score-function
    (RLOO) or DisARM estimate of logit ``j`` is large only in the draws where
    category ``c`` is sampled (when ``q_bc`` is small) or another category is
    (when ``q_bc`` is near 1), so with too few such draws the sample mean of
    the coordinate is a rare-event average, not a normal one, and the
    per-coordinate z-test does not apply (a confident encoder has categories
    with q ~ 1e-5: the draws then show a tight distribution far from the exact
    value, with |z| of 1e8).
    """
    import torch

    P = {k: bk.pyro.param(k).detach().double() for k in bk.names}
    xd = torch.as_tensor(x, dtype=torch.float64)
    last = max(int(k[3:-2]) for k in enc_names)
    hidden = torch.relu(common.mlp(P, "enc", xd, last, torch.relu))  # (B, H): input of the last layer
    logits = common.mlp(P, "enc", xd, last + 1, torch.relu)
    probs = torch.softmax(logits.reshape(len(x), L, C), -1).reshape(len(x), L * C)
    probs = torch.minimum(probs, 1 - probs)

    def smallest(contrib):  # contrib (B, ...) -> min over carrying examples of probs
        w = contrib.abs() / contrib.abs().sum(0).clamp(min=1e-300)
        p = probs.reshape(probs.shape[:1] + (1,) * (contrib.dim() - 2) + probs.shape[1:])
        return torch.where(w >= share, p.expand_as(w), torch.ones_like(w)).min(0).values

    out = []
    for k, n in zip(enc_names, enc_sizes):
        if k == f"enc{last}_W":
            out.append(smallest(hidden[:, :, None] * logit_grad[:, None, :]).reshape(-1))
        elif k == f"enc{last}_b":
            out.append(smallest(logit_grad))
        else:
            out.append(torch.ones(n, dtype=torch.float64))
    return torch.cat(out)


# ---------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", default="8x4", help="C x L: categories x variables")
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=20, help="the fixed minibatch")
    p.add_argument("--batch-seed", type=int, default=123,
                   help="seed of the fixed minibatch (Dataset.fixed_binarization)")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--check-draws", type=int, default=4000,
                   help="draws of each unbiased estimator for the exact-gradient check")
    p.add_argument("--check-min-nonzero", type=int, default=200,
                   help="test a coordinate only if its estimate is nonzero in this many "
                        "check draws (DESIGN.md: >= 200 nonzero draws per tested coordinate)")
    p.add_argument("--check-estimators", nargs="*", default=["disarm", "rloo"])
    p.add_argument("--estimators", nargs="*", default=DEFAULT_ESTIMATORS)
    p.add_argument("--reference", default="reinmax", help="the estimator of the ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=DATA_DIR / "mnist.npz")
    p.add_argument("--out", type=Path, default=Path("out/cvae_gradient_quality/results.json"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.draws % args.blocks or args.check_draws % args.blocks:
        raise SystemExit("--draws and --check-draws must be multiples of --blocks")

    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()

    # -- 1. train with ReinMax, the example's tuned settings --------------------
    ta = cvae.parse_args(["--estimator", "reinmax", "--latent", args.latent, "--seed",
                          str(args.seed), "--num-steps", str(max(1, args.train_steps)),
                          "--data", str(args.data)])
    train_set = Dataset(load_mnist(ta.data, "dynamic", "train_full").probs, "grey", "train")
    num_data = float(len(train_set))
    bk = common.get_backend("pyro", cvae.init_params(ta, np.random.default_rng(ta.seed)))
    model, guide = cvae.make_model_and_guide(bk, ta)
    train_elbo = common.make_elbo("pyro", "reinmax", temperature=ta.temperature, eta=ta.eta)
    common.set_seeds("pyro", ta.seed)
    x0 = train_set.probs[: ta.batch_size]
    example = (torch.as_tensor(x0), torch.arange(ta.batch_size), num_data)
    trainer = common.make_trainer(bk, model, guide, train_elbo, example, ta.seed, num_data,
                                  optim=ta.optim, lr=ta.lr)
    history = []
    t = time.perf_counter()
    for step, (i, x) in enumerate(train_set.batches(
            ta.batch_size, np.random.default_rng(ta.seed + 1000), args.train_steps), 1):
        history.append(-trainer.step(torch.as_tensor(x), torch.as_tensor(i), num_data) / num_data)
        if not args.no_progress and (step % 200 == 0 or step == args.train_steps):
            print(f"train reinmax step {step}: ELBO (last 100 mean) "
                  f"{np.mean(history[-100:]):.2f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t
    train_elbo_last = float(np.mean(history[-100:])) if history else None

    # -- 2. the fixed minibatch and the exact gradient -------------------------
    B = args.batch_size
    xb = train_set.fixed_binarization(B, seed=args.batch_seed)
    xt, idx = torch.as_tensor(xb), torch.arange(B)
    enc_names = [k for k in bk.names if k.startswith("enc")]
    enc = [bk.pyro.param(k).unconstrained() for k in enc_names]
    dim = sum(q.numel() for q in enc)
    t = time.perf_counter()
    ex = exact_loss_and_grad(bk, model, guide, xb, idx, num_data, enc_names, ta.L, ta.C)
    exact_s = time.perf_counter() - t
    exact = ex["grad"] / num_data  # the gradient the optimizer sees
    exact_loss = ex["loss"] / num_data
    lib_loss, lib_grad = library_exact(bk, model, guide, xb, num_data, enc_names, enc)
    lib_grad = lib_grad / num_data
    lib_rel = float((lib_grad - exact).norm() / exact.norm())
    print(f"exact (float64, {ta.C}^{ta.L} = {ta.C ** ta.L} configurations per example, "
          f"{exact_s:.1f} s): loss/num_data {exact_loss:.4f}, |grad|^2 {float(exact @ exact):.4g}, "
          f"{dim} encoder parameters; library exact_elbo (float32): loss/num_data "
          f"{lib_loss / num_data:.4f}, relative gradient difference {lib_rel:.2e}", flush=True)

    def draws(elbo, n, label, per_coord=None):
        """n gradient draws -> (Blocks, losses, seconds of loss_and_grads)."""
        acc = Blocks(dim, args.blocks)
        losses, secs = [], 0.0
        torch.manual_seed(args.seed + 1)
        for i in range(n):
            t = time.perf_counter()
            loss = elbo.loss_and_grads(model, guide, xt, idx, num_data)
            secs += time.perf_counter() - t
            g = torch.cat([q.grad.reshape(-1) for q in enc]).double() / num_data
            for q in trainer.params:
                q.grad = None
            acc.add(g - exact, i * args.blocks // n)
            if per_coord is not None:
                per_coord.add(g - exact, g)
            losses.append(loss / num_data)
            if not args.no_progress and (i + 1) % max(1, n // 4) == 0:
                print(f"  {label}: {i + 1}/{n} draws", file=sys.stderr, flush=True)
        return acc, np.asarray(losses), secs

    def make(spec):
        name, kw = parse_spec(spec, args.latent)
        form = kw.pop("form", None)
        elbo = common.make_elbo("pyro", name, **kw)
        if form is not None:  # ReinMax-CV's form (make_elbo does not pass it)
            elbo = type(elbo)(max_plate_nesting=1, temperature=elbo.temperature,
                              eta=elbo.eta, num_samples=elbo.num_samples, form=form)
        return elbo

    # -- cross-check: unbiased estimators against the exact gradient ------------
    # directions of the projection test: the exact gradient, its restriction to
    # each encoder tensor, two seeded Gaussian directions
    dir_names, dirs = ["exact"], [exact / exact.norm()]
    off = 0
    for k, q in zip(enc_names, enc):
        v = torch.zeros(dim, dtype=torch.float64)
        v[off : off + q.numel()] = exact[off : off + q.numel()]
        off += q.numel()
        if v.norm() > 0:
            dir_names.append("exact|" + k)
            dirs.append(v / v.norm())
    gen = torch.Generator().manual_seed(args.seed + 7)
    for r in range(2):
        v = torch.randn(dim, generator=gen, dtype=torch.float64)
        dir_names.append(f"random{r}")
        dirs.append(v / v.norm())
    dirs = torch.stack(dirs)
    offsets = np.cumsum([0] + [q.numel() for q in enc])
    cat_prob = category_probability(bk, xb, enc_names, [q.numel() for q in enc], ta.L, ta.C,
                                    ex["logit_grad"])
    checks = {}
    for spec in args.check_estimators:
        elbo = make(spec)
        pc = PerCoordinate(dim, dirs)
        _, losses, secs = draws(elbo, args.check_draws, f"check {spec}", pc)
        N = pc.n
        evals = evaluations_per_step(elbo)
        se = torch.sqrt(pc.m2 / (N - 1) / N)
        varying = se > 0
        z_all = pc.mean[varying] / se[varying]
        well = N * evals * cat_prob >= args.check_min_nonzero
        tested = (pc.nonzero >= args.check_min_nonzero) & varying & well
        never = pc.nonzero == 0
        rare = ~tested & ~never
        z = pc.mean[tested] / se[tested]
        # the worst tested coordinates, located
        zfull = torch.zeros(dim, dtype=torch.float64)
        zfull[tested] = z
        worst = []
        for j in zfull.abs().argsort(descending=True)[:5].tolist():
            k = int(np.searchsorted(offsets, j, side="right")) - 1
            worst.append({"param": enc_names[k],
                          "index": [int(i) for i in np.unravel_index(j - offsets[k],
                                                                     tuple(enc[k].shape))],
                          "z": float(zfull[j]), "exact": float(exact[j]),
                          "mean": float(exact[j] + pc.mean[j]), "se": float(se[j]),
                          "nonzero_draws": int(pc.nonzero[j])})
        # the coordinates left out by the category rule, and their worst z
        left = varying & ~well
        z_left = pc.mean[left] / se[left]
        n_tested = int(tested.sum())
        proj = np.asarray(pc.proj)  # (N, directions)
        z_proj = proj.mean(0) / (proj.std(0, ddof=1) / math.sqrt(N))
        z_loss = float((losses.mean() - exact_loss) / (losses.std(ddof=1) / math.sqrt(N)))
        power = float((0.1 * exact[tested].abs() / se[tested]).max()) if n_tested else 0.0
        c = {
            "draws": N, "min_nonzero_draws": args.check_min_nonzero,
            "coordinates_tested": n_tested,
            "coordinates_never_nonzero": int(never.sum()),
            "never_nonzero_max_abs_exact": float(exact[never].abs().max()) if never.any() else 0.0,
            "never_nonzero_count_exact_nonzero": int((exact[never] != 0).sum()),
            "coordinates_rare_untested": int(rare.sum()),
            "evaluations_per_draw": evals,
            "all_varying_coordinates": {"count": int(varying.sum()),
                                        "max_abs_z": float(z_all.abs().max()),
                                        "count_abs_z_gt_5": int((z_all.abs() > 5).sum())},
            "rare_category_coordinates": {"count": int(left.sum()),
                                          "max_abs_z": float(z_left.abs().max()) if left.any()
                                          else None,
                                          "count_abs_z_gt_5": int((z_left.abs() > 5).sum())},
            "max_abs_z": float(z.abs().max()) if n_tested else None,
            "count_abs_z_gt_5": int((z.abs() > 5).sum()),
            "expected_count_abs_z_gt_5_normal": n_tested * math.erfc(5 / math.sqrt(2)),
            "count_abs_z_gt_4": int((z.abs() > 4).sum()),
            "expected_count_abs_z_gt_4_normal": n_tested * math.erfc(4 / math.sqrt(2)),
            "mean_z2": float((z * z).mean()) if n_tested else None,
            "worst_tested": worst,
            "z_projections": dict(zip(dir_names, map(float, z_proj))),
            "z_loss": z_loss, "power_max_0.1g_over_se": power, "ms_per_draw": 1000 * secs / N,
        }
        checks[spec] = c
        print(f"check {spec} ({N} draws): max|z| {c['max_abs_z']:.2f} over {n_tested} "
              f"coordinates with >= {args.check_min_nonzero} nonzero draws (|z|>5: "
              f"{c['count_abs_z_gt_5']}, a normal expects "
              f"{c['expected_count_abs_z_gt_5_normal']:.2f}; |z|>4: {c['count_abs_z_gt_4']}, "
              f"expects {c['expected_count_abs_z_gt_4_normal']:.1f}), mean z^2 "
              f"{c['mean_z2']:.3f}, power max 0.1|g|/se {power:.1f}; z of projections "
              + ", ".join(f"{k} {v:+.2f}" for k, v in c["z_projections"].items())
              + f"; z of loss {z_loss:+.2f}; untested: {c['coordinates_rare_untested']} rare, "
              f"{c['coordinates_never_nonzero']} never nonzero (of which "
              f"{c['never_nonzero_count_exact_nonzero']} with exact != 0, max |exact| "
              f"{c['never_nonzero_max_abs_exact']:.2g}); all {int(varying.sum())} varying "
              f"coordinates: max|z| {c['all_varying_coordinates']['max_abs_z']:.3g} "
              f"(|z|>5: {c['all_varying_coordinates']['count_abs_z_gt_5']}), of which "
              f"{int(left.sum())} output-layer coordinates with < {args.check_min_nonzero} "
              f"expected draws of their category: max|z| "
              f"{c['rare_category_coordinates']['max_abs_z'] or 0:.3g} "
              f"(|z|>5: {c['rare_category_coordinates']['count_abs_z_gt_5']}); worst tested: "
              + "; ".join(f"{w['param']}{w['index']} z {w['z']:+.3g} exact {w['exact']:.3g} "
                          f"mean {w['mean']:.3g} se {w['se']:.2g} nonzero {w['nonzero_draws']}"
                          for w in worst[:3]), flush=True)
        del pc

    # -- 3. every estimator: bias^2, variance, MSE --------------------------------
    rows, loo_by = {}, {}
    for spec in args.estimators:
        elbo = make(spec)
        acc, losses, secs = draws(elbo, args.draws, spec)
        full, loo = block_stats(acc)
        row = {"estimator": spec, "class": type(elbo).__name__,
               "settings": settings_text(spec.partition(":")[0], elbo)}
        for key in ("bias2", "variance", "mse", "bias2_raw"):
            row[key] = full[key]
            row[key + "_se"] = jackknife_se([v[key] for v in loo])
        row["ms_per_draw"] = 1000 * secs / args.draws
        row["z_loss"] = float((losses.mean() - exact_loss)
                              / (losses.std(ddof=1) / math.sqrt(len(losses))))
        rows[spec], loo_by[spec] = row, loo
        del acc
    ref = args.reference if args.reference in rows else None
    if ref:
        r_full = rows[ref]
        for spec, row in rows.items():
            for key in ("variance", "mse"):
                row[f"{key}_ratio"] = row[key] / r_full[key]
                row[f"{key}_ratio_se"] = jackknife_se(
                    [a[key] / b[key] for a, b in zip(loo_by[spec], loo_by[ref])])

    # -- table and JSON -------------------------------------------------------------
    def pm(v, s, fmt="{:.4g}"):
        return f"{fmt.format(v)} ± {fmt.format(s)}"

    head = ["estimator", "settings", "bias^2", "variance", "MSE", f"var / {ref}",
            f"MSE / {ref}", "ms/draw"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, r in rows.items():
        lines.append("| " + " | ".join([
            spec, r["settings"], pm(r["bias2"], r["bias2_se"]), pm(r["variance"], r["variance_se"]),
            pm(r["mse"], r["mse_se"]),
            pm(r.get("variance_ratio", float("nan")), r.get("variance_ratio_se", float("nan")),
               "{:.3f}"),
            pm(r.get("mse_ratio", float("nan")), r.get("mse_ratio_se", float("nan")), "{:.3f}"),
            f"{r['ms_per_draw']:.1f}"]) + " |")
    table = "\n".join(lines)
    print(f"\nencoder gradient (loss / num_data), {dim} parameters, |exact|^2 = "
          f"{float(exact @ exact):.4g}; {args.draws} draws per estimator, jackknife SE over "
          f"{args.blocks} blocks\n" + table, flush=True)
    result = {
        "benchmark": "cvae_gradient_quality", "backend": "pyro", "latent": args.latent,
        "C": ta.C, "L": ta.L, "configurations": ta.C ** ta.L,
        "train": {"estimator": "reinmax", "steps": args.train_steps, "batch_size": ta.batch_size,
                  "lr": ta.lr, "optim": ta.optim, "temperature": ta.temperature,
                  "seed": args.seed, "train_elbo_last100": train_elbo_last, "seconds": train_s},
        "batch_size": B, "batch_seed": args.batch_seed, "num_data": num_data,
        "targets": "grey/255", "encoder_params": enc_names, "encoder_dim": dim,
        "gradient_scale": "d loss / d encoder params / num_data (the trainer's grad_scale)",
        "exact": {"loss_per_num_data": exact_loss, "grad_norm2": float(exact @ exact),
                  "seconds": exact_s, "q_sum_max_err": ex["q_sum_max_err"],
                  "library_exact_elbo_loss_per_num_data": lib_loss / num_data,
                  "library_exact_elbo_relative_grad_diff": lib_rel},
        "checks": checks, "draws": args.draws, "blocks": args.blocks,
        "se": "delete-one-block jackknife", "reference": ref,
        "estimators": list(rows.values()), "table": table,
        "wall_time_s": time.perf_counter() - t_start, "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wall time {result['wall_time_s']:.0f} s; wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
