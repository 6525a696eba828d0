r"""
The ReinMax MNIST-VAE harness (Liu et al. 2023; also Beyond ReinMax): a VAE with
L one-hot categorical latents of C categories each ("C x L", ``--latent 8x4``),
encoder 784-512-256-(L*C) and decoder (L*C)-256-512-784 with ReLU, uniform prior,
MNIST grey values in [0, 1] as Bernoulli (BCE) targets (not binarized), train on
all 60000 training images, test on the 10000 test images, batch 100.

Latent sites are ``OneHotCategorical(logits).to_event(1)`` of shape (L, C)
(``pyro_binary_grads.OneHotCategorical`` / ``numpyro_binary_grads.OneHotCategorical``).
Estimators (both backends): ST, straight-through Gumbel-softmax, Gumbel-Rao,
ReinMax, ReinMax-Rao, ReinMax-CV (as its authors ran it; ``--cv-form fresh`` for
our earlier form, to compare), RLOO and TraceGraph.

By default (lr, temperature, optimizer) follow the papers' tuned values for the
chosen size (the docs' Reference setups page, ``docs/reference_setups.rst``; ReinMax-CV: the author's released
configuration; ReinMax-Rao: ReinMax-CV's, our choice; RLOO: lr 5e-4 with the
size's optimizer, our choice); ``--lr``, ``--temperature`` and ``--optim`` override.
The paper budget is 160 epochs = 96000 steps (``--num-steps 96000``).

Figures: the training objective (single-sample ELBO, nats per example, as the
papers' -ELBO with the sign flipped), the test ELBO and the test 100-sample
bound on the full test set at the end. The KL term: ``--kl sample`` (default)
trains on the one-sample estimate :math:`\log p(z) - \log q(z)`, which the
estimator differentiates like the rest of :math:`f`; ``--kl analytic`` trains,
as the authors' harness does, on :math:`E_q \log p(x \mid z) - KL(q \| p)`
with the KL exact: both latent sites are masked (``.mask(False)``: no
:math:`\log p(z)`, :math:`\log q(z)` terms) and the model adds
``factor("kl", -KL)`` computed from the encoder's logits, so the estimator
differentiates only :math:`\log p(x \mid z)` through :math:`z` and the KL's
gradient is exact. Both objectives have the same value in expectation; the
test figures always use the unmasked program.

    python examples/categorical_vae.py --estimator reinmax --latent 8x4 --num-steps 2000
"""

import argparse
import time
from pathlib import Path

import numpy as np

import common  # noqa: E402

common.limit_threads()

from data import DATA_DIR, Dataset, load_mnist  # noqa: E402

#: (C x L) -> estimator -> (lr, temperature, optimizer[, eta])
TUNED = {
    "8x4": {"st": (1e-3, 1.3, "adam"), "gumbel_st": (3e-4, 0.5, "adam"),
            "gumbel_rao": (5e-4, 0.5, "adam"), "reinmax": (5e-4, 1.3, "adam"),
            "reinmax_cv": (5e-4, 1.0, "adam", 1.5)},
    "4x24": {"st": (1e-3, 1.5, "radam"), "gumbel_st": (5e-4, 0.3, "radam"),
             "gumbel_rao": (5e-4, 0.3, "radam"), "reinmax": (5e-4, 1.5, "radam"),
             "reinmax_cv": (5e-4, 1.3, "adam", 1.5)},
    "8x16": {"st": (1e-3, 1.5, "radam"), "gumbel_st": (5e-4, 0.5, "radam"),
             "gumbel_rao": (7e-4, 0.7, "radam"), "reinmax": (7e-4, 1.5, "radam"),
             "reinmax_cv": (5e-4, 1.1, "radam", 1.5)},
    "16x12": {"st": (5e-4, 1.5, "adam"), "gumbel_st": (7e-4, 0.7, "radam"),
              "gumbel_rao": (5e-4, 1.0, "adam"), "reinmax": (7e-4, 1.5, "radam"),
              "reinmax_cv": (5e-4, 0.7, "radam", 1.5)},
    "64x8": {"st": (5e-4, 1.5, "adam"), "gumbel_st": (7e-4, 0.7, "radam"),
             "gumbel_rao": (7e-4, 2.0, "adam"), "reinmax": (5e-4, 1.5, "radam"),
             "reinmax_cv": (5e-4, 0.7, "radam", 1.5)},
    "10x30": {"st": (7e-3, 1.4, "radam"), "gumbel_st": (5e-4, 0.5, "radam"),
              "gumbel_rao": (5e-4, 1.0, "radam"), "reinmax": (5e-4, 1.3, "radam"),
              "reinmax_cv": (5e-4, 0.7, "radam", 1.0)},
}


def tuned(latent, estimator):
    """(lr, temperature, optimizer, eta) for a size and estimator."""
    table = TUNED.get(latent, TUNED["8x4"])
    if estimator in table:
        row = table[estimator]
    elif estimator == "reinmax_rao":
        row = table["reinmax_cv"][:3]
    else:  # rloo, tracegraph: lr 5e-4, the size's ReinMax optimizer
        row = (5e-4, None, table["reinmax"][2])
    return row[0], row[1], row[2], (row[3] if len(row) > 3 else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common.add_common_args(p, "out/categorical_vae", list(common.CATEGORICAL_ESTIMATORS),
                           "reinmax")
    p.add_argument("--latent", default="8x4", help="C x L: categories x variables (default 8x4)")
    p.add_argument("--data", type=Path, default=DATA_DIR / "mnist.npz")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--eta", type=float, default=None, help="ReinMax-CV's coefficient")
    p.add_argument("--rao-samples", type=int, default=None,
                   help="conditional Gumbel draws of Gumbel-Rao / ReinMax-Rao / -CV (class "
                        "defaults 10, 10, 100)")
    p.add_argument("--cv-form", choices=("authors", "fresh"), default="authors",
                   help="ReinMax-CV's Gumbel-softmax term: 'authors' (default, the estimator "
                        "the authors ran) or 'fresh' (ours, a fresh Gumbel; for comparison)")
    p.add_argument("--optim", choices=("adam", "radam"), default=None)
    p.add_argument("--kl", choices=("sample", "analytic"), default="sample",
                   help="the KL term in training: one-sample estimate (default) or exact, "
                        "as the authors' harness (masked sites + factor)")
    args = p.parse_args(argv)
    args.C, args.L = (int(v) for v in args.latent.lower().split("x"))
    lr, temp, optim, eta = tuned(args.latent, args.estimator)
    args.lr = lr if args.lr is None else args.lr
    args.temperature = temp if args.temperature is None else args.temperature
    args.optim = optim if args.optim is None else args.optim
    args.eta = eta if args.eta is None else args.eta
    args.batch_size = args.batch_size or 100
    args.num_steps = args.num_steps or 2000
    return args


def init_params(args, rng):
    P = {}
    common.mlp_init(rng, (784, 512, 256, args.L * args.C), "enc", P)
    common.mlp_init(rng, (args.L * args.C, 256, 512, 784), "dec", P)
    return P


def kl_to_uniform(bk, logits):
    """:math:`KL(q \\| p)` of ``OneHotCategorical(logits)`` (..., L, C) to the
    uniform prior, summed over the L variables."""
    if bk.name == "pyro":
        lq = bk.torch.log_softmax(logits, -1)
        q = lq.exp()
    else:
        import jax

        lq = jax.nn.log_softmax(logits, -1)
        q = bk.jnp.exp(lq)
    return (q * (lq + np.log(logits.shape[-1]))).sum((-2, -1))


def make_model_and_guide(bk, args, kl="sample"):
    """Model and guide; ``kl="analytic"``: the training program of ``--kl
    analytic`` (masked latent sites, the exact KL as a factor)."""
    D, ops = bk.dist, bk.ops
    L, C = args.L, args.C
    analytic = kl == "analytic"
    factor = bk.pyro.factor if bk.name == "pyro" else bk.numpyro.factor

    def encoder_logits(P, x):
        logits = common.mlp(P, "enc", x, 3, ops.relu)
        return ops.reshape(logits, logits.shape[:-1] + (L, C))

    def model(x, idx, num_data):
        P = bk.params()
        with bk.plate(idx, num_data):
            prior = bk.one_hot_categorical(ops.zeros((L, C))).to_event(1)
            z = bk.sample("z", prior.mask(False) if analytic else prior)
            h = ops.reshape(z, z.shape[:-2] + (L * C,))
            bk.sample("x", D.Bernoulli(logits=common.mlp(P, "dec", h, 3, ops.relu)).to_event(1),
                      obs=x)
            if analytic:
                factor("kl", -kl_to_uniform(bk, encoder_logits(P, x)))

    def guide(x, idx, num_data):
        P = bk.params()
        with bk.plate(idx, num_data):
            q = bk.one_hot_categorical(encoder_logits(P, x)).to_event(1)
            bk.sample("z", q.mask(False) if analytic else q)

    return model, guide


def make_elbo(args):
    """The ELBO of ``--estimator`` (``common.make_elbo``), ReinMax-CV with ``--cv-form``."""
    elbo = common.make_elbo(args.backend, args.estimator, num_samples=args.num_samples,
                            temperature=args.temperature, eta=args.eta,
                            rao_samples=args.rao_samples)
    if args.estimator == "reinmax_cv" and args.cv_form != elbo.form:
        kw = {"max_plate_nesting": 1} if args.backend == "pyro" else {}
        elbo = type(elbo)(temperature=elbo.temperature, eta=elbo.eta,
                          num_samples=elbo.num_samples, form=args.cv_form, **kw)
    return elbo


def make_args(bk, x):
    return bk.asarray(x), bk.asarray(np.arange(len(x))), len(x)


def output_name(args):
    form = "_fresh" if args.estimator == "reinmax_cv" and args.cv_form == "fresh" else ""
    kl = "_analytic" if args.kl == "analytic" else ""
    return f"cvae_{args.backend}_{args.latent}_{args.estimator}{form}{kl}{args.tag}"


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args)
    name = output_name(args)
    if hasattr(common, "check_outputs"):
        common.check_outputs(args, name)  # before training: no silent overwrite
    t0 = time.perf_counter()
    # grey values / 255 as targets: a Dataset whose "binarization" is the identity
    train_set = Dataset(load_mnist(args.data, "dynamic", "train_full").probs, "grey", "train")
    test_set = Dataset(load_mnist(args.data, "dynamic", "test").probs, "grey", "test")
    args.num_data = len(train_set)
    rng = np.random.default_rng(args.seed)
    bk = common.get_backend(args.backend, init_params(args, rng))
    model, guide = make_model_and_guide(bk, args)  # the test figures' program
    train_model, train_guide = make_model_and_guide(bk, args, args.kl)
    elbo = make_elbo(args)
    common.set_seeds(args.backend, args.seed)
    num_data = float(len(train_set))
    x0 = train_set.probs[: args.batch_size]
    example = (bk.asarray(x0), bk.asarray(np.arange(args.batch_size)), num_data)
    trainer = common.make_trainer(bk, train_model, train_guide, elbo, example, args.seed, num_data,
                                  optim=args.optim, lr=args.lr)
    bound = common.make_bound(bk, model, guide, make_args)
    x_eval = test_set.probs[common.eval_subset(len(test_set), args.eval_size, args.test_seed)]
    K = args.eval_samples

    batches = train_set.batches(args.batch_size, np.random.default_rng(args.seed + 1000),
                                args.num_steps)

    def step_args(batch):
        idx, x = batch
        return bk.asarray(x), bk.asarray(idx), num_data

    history, tests, train_time, first = common.train(
        args, trainer, batches, step_args, lambda s: bound(trainer, (x_eval,), K),
        f"{args.backend}/{args.latent}/{args.estimator}",
    )
    t_eval = time.perf_counter()
    x_test = test_set.probs[common.eval_subset(len(test_set), args.final_eval_size, args.test_seed)]
    final = bound(trainer, (x_test,), K)
    final_elbo = bound(trainer, (x_test,), 1)
    final_eval_s = time.perf_counter() - t_eval
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"{name}.png"
    temp = "" if args.temperature is None else f", tau {args.temperature:g}"
    common.save_plot(
        plot, history, tests,
        f"Categorical VAE {args.latent} (C x L), {args.estimator} [{args.backend}], "
        f"{args.optim} lr {args.lr:g}{temp}",
        f"test {K}-sample bound ({len(x_eval)} examples)",
        final=(final, len(x_test)),
    )
    steps = len(history)
    epoch = -(-len(train_set) // args.batch_size)
    result = {
        "example": "categorical_vae", "backend": args.backend, "latent": args.latent,
        "estimator": args.estimator, "steps": steps, "epochs": steps * args.batch_size / len(train_set),
        "batch_size": args.batch_size, "lr": args.lr, "optim": args.optim, "kl": args.kl,
        "temperature": args.temperature, "eta": args.eta,
        "cv_form": args.cv_form if args.estimator == "reinmax_cv" else None,
        "rao_samples": getattr(elbo, "num_samples", None)
        if args.estimator in ("gumbel_rao", "reinmax_rao", "reinmax_cv") else None,
        "seed": args.seed,
        "data": str(args.data), "targets": "grey/255",
        "train_objective_last10pct": common.mean_last(history),
        # one epoch is num_data / batch steps (600 at batch 100): None for shorter runs
        "train_objective_last_epoch": (float(np.mean([h[1] for h in history[-epoch:]]))
                                       if steps >= epoch else None),
        f"test_bound_{K}_subset": tests[-1][1], "eval_size": len(x_eval),
        "test_elbo": final_elbo, f"test_bound_{K}": final, "test_size": len(x_test),
        "ms_per_step": 1000 * train_time / max(1, steps - 1), "first_step_s": first,
        "steps_per_s": (steps - 1) / train_time if train_time else None,
        "final_eval_s": final_eval_s, "wall_time_s": time.perf_counter() - t0,
        "plot": str(plot),
    }
    common.print_summary(result)
    return common.finish(args, name, result, history, tests)


if __name__ == "__main__":
    main()
