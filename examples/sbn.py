"""
Sigmoid belief networks (SBNs) on MNIST, Fashion-MNIST or the statically
binarized MNIST, trained with a drop-in ELBO of ``pyro_binary_grads`` /
``numpyro_binary_grads`` (or the backend's ``TraceGraph_ELBO``).

Models (``--model``; 200 Bernoulli latents per stochastic layer by default)::

    linear1     b ~ Bern(sigmoid(prior)),           x ~ Bern(sigmoid(W b + c))
    linear2     b2 ~ Bern(prior), b1 ~ Bern(W2 b2 + c2), x ~ Bern(W1 b1 + c1)    (200-200)
    nonlinear   b ~ Bern(prior), x ~ Bern(MLP(b)), MLP = two deterministic layers of
                200 units (tanh for --preset rebar, LeakyReLU(0.3) otherwise)

The guide mirrors the model (x -> b1 [-> b2]); its input is centred by the
training mean; the decoder's output bias starts at the logit of the training
mean. With ``--pm1`` (``--preset rebar``) binary variables enter the networks as
{-1, 1}. Everything runs in a data plate scaled to the training set; the
figures are per example in nats (the papers' numbers).

Presets (``--preset``; explicit flags override):

* ``disarm`` (Dong, Mnih & Tucker 2020): dynamically binarized MNIST, train =
  first 50000 images, batch 50, Adam lr 1e-4 for the networks and SGD lr 1e-2 for
  the prior logits, 1e6 steps, LeakyReLU(0.3) nonlinear nets.
* ``rebar`` (Tucker et al. 2017, App. G): statically binarized MNIST
  (``binarized_mnist.npz``), batch 24, Adam beta2 = 0.99999, lr 3e-4 (linear) /
  1e-4 (nonlinear) (one value of the paper's grid, not a grid search), 2e6 steps,
  {-1, 1} variables, tanh nonlinear nets.

Without a preset: ``--dataset``'s defaults, batch 50, Adam lr 1e-3, 2000 steps.

The test figure is the 100-sample bound (``--eval-samples``): on a seeded random
test subset (``--eval-size``) every ``--eval-every`` steps, and on the whole test
set at the end. Examples::

    python examples/sbn.py --num-steps 2000                       # DisARM, Pyro, linear1
    python examples/sbn.py --backend numpyro --estimator arm --num-steps 2000
    python examples/sbn.py --preset rebar --model linear2 --estimator rloo --num-steps 5000
"""

import argparse
import time
from pathlib import Path

import numpy as np

import common  # noqa: E402  (sets sys.path; limit_threads before torch / jax)

common.limit_threads()

from data import load_mnist, output_bias_init  # noqa: E402

MODELS = ("linear1", "linear2", "nonlinear")

PRESETS = {
    "none": dict(dataset="mnist", batch_size=50, lr=1e-3, beta2=0.999, num_steps=2000,
                 prior_optim=None, prior_lr=None, act="leaky_relu", pm1=False),
    "disarm": dict(dataset="mnist", batch_size=50, lr=1e-4, beta2=0.999, num_steps=1_000_000,
                   prior_optim="sgd", prior_lr=1e-2, act="leaky_relu", pm1=False),
    "rebar": dict(dataset="binarized_mnist", batch_size=24, lr=3e-4, beta2=0.99999,
                  num_steps=2_000_000, prior_optim=None, prior_lr=None, act="tanh", pm1=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common.add_common_args(p, "out/sbn", list(common.BINARY_ESTIMATORS), "disarm")
    common.add_sbn_args(p, PRESETS, MODELS)
    return common.apply_preset(p.parse_args(argv), PRESETS)


# ---------------------------------------------------------------------------
# parameters, model, guide (one definition for both backends)


def init_params(args, train, rng):
    H, D = args.hidden, train.dim
    P = {"prior_logits": np.zeros(H, np.float32)}
    out_bias = output_bias_init(train)
    if args.model == "nonlinear":
        common.mlp_init(rng, (H, 200, 200, D), "dec", P, out_bias)
        common.mlp_init(rng, (D, 200, 200, H), "enc", P)
    else:
        common.mlp_init(rng, (H, D), "dec", P, out_bias)
        common.mlp_init(rng, (D, H), "enc", P)
        if args.model == "linear2":
            common.mlp_init(rng, (H, H), "dec2_", P)
            common.mlp_init(rng, (H, H), "enc2_", P)
    return P


def model_and_guide(bk, args, input_mean):
    D = bk.dist
    act = getattr(bk.ops, args.act)
    n = 3 if args.model == "nonlinear" else 1
    mean = bk.asarray(input_mean)

    def inp(b):
        return 2 * b - 1 if args.pm1 else b

    def model(x, idx, num_data):
        P = bk.params()
        with bk.plate(idx, num_data):
            if args.model == "linear2":
                b2 = bk.sample("b2", D.Bernoulli(logits=P["prior_logits"]).to_event(1))
                b1 = bk.sample("b1", D.Bernoulli(logits=common.mlp(P, "dec2_", inp(b2), 1, act))
                               .to_event(1))
            else:
                b1 = bk.sample("b1", D.Bernoulli(logits=P["prior_logits"]).to_event(1))
            bk.sample("x", D.Bernoulli(logits=common.mlp(P, "dec", inp(b1), n, act)).to_event(1),
                      obs=x)

    def guide(x, idx, num_data):
        P = bk.params()
        with bk.plate(idx, num_data):
            b1 = bk.sample("b1", D.Bernoulli(logits=common.mlp(P, "enc", x - mean, n, act))
                           .to_event(1))
            if args.model == "linear2":
                bk.sample("b2", D.Bernoulli(logits=common.mlp(P, "enc2_", inp(b1), 1, act))
                          .to_event(1))

    return model, guide


def make_args(bk, x):
    """Model arguments for evaluation: the whole chunk, ``num_data = len`` (scale 1)."""
    return bk.asarray(x), bk.asarray(np.arange(len(x))), len(x)


def build(args, train):
    """Backend, model, guide and trainer (shared with gradient_variance.py)."""
    rng = np.random.default_rng(args.seed)
    bk = common.get_backend(args.backend, init_params(args, train, rng))
    model, guide = model_and_guide(bk, args, train.mean().astype(np.float32))
    elbo = common.make_elbo(args.backend, args.estimator, num_samples=args.num_samples)
    common.set_seeds(args.backend, args.seed)
    x0 = train.binarized(np.arange(args.batch_size), rng)
    example = (bk.asarray(x0), bk.asarray(np.arange(args.batch_size)), float(len(train)))
    trainer = common.make_trainer(
        bk, model, guide, elbo, example, args.seed, len(train), optim="adam", lr=args.lr,
        betas=(0.9, args.beta2),
        second_group=("prior_logits",) if args.prior_optim else (),
        second_optim=args.prior_optim, second_lr=args.prior_lr,
    )
    return bk, model, guide, trainer


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    name = f"sbn_{args.backend}_{args.model}_{args.estimator}{args.tag}"
    common.check_outputs(args, name)  # before training: no silent overwrite
    common.set_threads(args)
    train_set = load_mnist(args.data, args.binarize, "train")
    test_set = load_mnist(args.data, args.binarize, "test")
    args.num_data = len(train_set)
    bk, model, guide, trainer = build(args, train_set)
    bound = common.make_bound(bk, model, guide, make_args)
    x_eval = test_set.fixed_binarization(args.eval_size, args.test_seed)
    K = args.eval_samples

    rng = np.random.default_rng(args.seed + 1000)
    batches = train_set.batches(args.batch_size, rng, args.num_steps)
    num_data = float(len(train_set))

    def step_args(batch):
        idx, x = batch
        return bk.asarray(x), bk.asarray(idx), num_data

    history, tests, train_time, first = common.train(
        args, trainer, batches, step_args, lambda s: bound(trainer, (x_eval,), K),
        f"{args.backend}/{args.model}/{args.estimator}",
    )
    t_eval = time.perf_counter()
    x_test = test_set.fixed_binarization(args.final_eval_size, args.test_seed)
    final = bound(trainer, (x_test,), K)
    final_eval_s = time.perf_counter() - t_eval
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"{name}.png"
    common.save_plot(
        plot, history, tests,
        f"SBN {args.model} ({Path(args.data).stem}, {args.binarize}), {args.estimator} "
        f"[{args.backend}], batch {args.batch_size}, lr {args.lr:g}",
        f"test {K}-sample bound ({len(x_eval)} examples)",
        final=(final, len(x_test)),
    )
    steps = len(history)
    result = {
        "example": "sbn", "backend": args.backend, "model": args.model,
        "estimator": args.estimator, "preset": args.preset, "steps": steps,
        "batch_size": args.batch_size, "lr": args.lr, "beta2": args.beta2,
        "prior_optim": args.prior_optim, "prior_lr": args.prior_lr, "act": args.act,
        "pm1": args.pm1, "seed": args.seed, "data": str(args.data), "binarize": args.binarize,
        "train_objective_last10pct": common.mean_last(history),
        f"test_bound_{K}_subset": tests[-1][1], "eval_size": len(x_eval),
        f"test_bound_{K}": final, "test_size": len(x_test), "test_seed": args.test_seed,
        "ms_per_step": 1000 * train_time / max(1, steps - 1), "first_step_s": first,
        "steps_per_s": (steps - 1) / train_time if train_time else None,
        "final_eval_s": final_eval_s, "wall_time_s": time.perf_counter() - t0,
        "plot": str(plot),
    }
    common.print_summary(result)
    return common.finish(args, name, result, history, tests)


def __getattr__(name):
    # the original torch.nn.Module SBN, for benchmarks/bench_pyro_disarm.py
    if name in ("SBN", "make_model_and_guide"):
        import sbn_module

        return getattr(sbn_module, name)
    raise AttributeError(name)


if __name__ == "__main__":
    main()
