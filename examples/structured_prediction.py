"""
Structured prediction on MNIST (REBAR, Tucker et al. 2017, App. G): predict the
lower half of a digit (pixels 392..783) from its upper half (0..391) through
200 Bernoulli latents per stochastic layer. The guide is the conditional prior
itself, so the objective is

    E_{p(b | x_up)} [log p(x_low | b)]      and the test figure is the
    100-sample bound  log 1/K sum_k p(x_low | b_k),  b_k ~ p(b | x_up).

Models (``--model``)::

    linear1     x_up -> b -> x_low                  (linear maps)
    linear2     x_up -> b1 -> b2 -> x_low           (200-200)
    nonlinear   x_up -> MLP -> b -> MLP -> x_low    (two deterministic layers of 200
                                                     units, tanh under --preset rebar)

In the model, the conditional-prior logits are ``stop_gradient``-ed: log p(b|x_up)
and log q(b|x_up) cancel in value, and the prior network is trained through the
guide's estimator only (a differentiable prior term would add a baseline-free
score term of mean zero). The prior network's input is centred by the training
mean of the upper halves; the decoder's output bias starts at the logit of the
training mean of the lower halves.

Presets: ``rebar`` (statically binarized MNIST, batch 24, Adam beta2 = 0.99999,
lr 3e-4 linear / 1e-4 nonlinear, 2e6 steps, {-1, 1} variables, tanh); ``none``
(the same data, batch 50, Adam lr 1e-3, 2000 steps).

    python examples/structured_prediction.py --num-steps 2000
    python examples/structured_prediction.py --backend numpyro --estimator arm --preset rebar --num-steps 5000
"""

import argparse
import time
from pathlib import Path

import numpy as np

import common  # noqa: E402

common.limit_threads()

from data import load_mnist  # noqa: E402

MODELS = ("linear1", "linear2", "nonlinear")
HALF = 392

PRESETS = {
    "none": dict(dataset="binarized_mnist", batch_size=50, lr=1e-3, beta2=0.999,
                 num_steps=2000, prior_optim=None, prior_lr=None, act="tanh", pm1=False),
    "rebar": dict(dataset="binarized_mnist", batch_size=24, lr=3e-4, beta2=0.99999,
                  num_steps=2_000_000, prior_optim=None, prior_lr=None, act="tanh", pm1=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common.add_common_args(p, "out/structured_prediction", list(common.BINARY_ESTIMATORS),
                           "disarm")
    common.add_sbn_args(p, PRESETS, MODELS)
    return common.apply_preset(p.parse_args(argv), PRESETS)


def logit_mean(x, eps=1e-3):
    m = np.clip(x.mean(0), eps, 1 - eps)
    return (np.log(m) - np.log1p(-m)).astype(np.float32)


def init_params(args, train_probs, rng):
    H = args.hidden
    P = {}
    out_bias = logit_mean(train_probs[:, HALF:])
    if args.model == "nonlinear":
        common.mlp_init(rng, (HALF, 200, 200, H), "prior", P)
        common.mlp_init(rng, (H, 200, 200, HALF), "dec", P, out_bias)
    else:
        common.mlp_init(rng, (HALF, H), "prior", P)
        common.mlp_init(rng, (H, HALF), "dec", P, out_bias)
        if args.model == "linear2":
            common.mlp_init(rng, (H, H), "prior2_", P)
    return P


def make_model_and_guide(bk, args, mean_up):
    D = bk.dist
    act = getattr(bk.ops, args.act)
    n = 3 if args.model == "nonlinear" else 1
    mean = bk.asarray(mean_up)

    def inp(b):
        return 2 * b - 1 if args.pm1 else b

    def chain(P, xu, sg):
        b = bk.sample("b1", D.Bernoulli(logits=sg(common.mlp(P, "prior", xu - mean, n, act)))
                      .to_event(1))
        if args.model == "linear2":
            b = bk.sample("b2", D.Bernoulli(logits=sg(common.mlp(P, "prior2_", inp(b), 1, act)))
                          .to_event(1))
        return b

    def model(xu, xl, idx, num_data):
        P = bk.params()
        with bk.plate(idx, num_data):
            b = chain(P, xu, bk.ops.sg)
            bk.sample("x_low", D.Bernoulli(logits=common.mlp(P, "dec", inp(b), n, act))
                      .to_event(1), obs=xl)

    def guide(xu, xl, idx, num_data):
        P = bk.params()
        with bk.plate(idx, num_data):
            chain(P, xu, lambda a: a)

    return model, guide


def make_args(bk, x):
    return (bk.asarray(x[:, :HALF]), bk.asarray(x[:, HALF:]), bk.asarray(np.arange(len(x))),
            len(x))


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    name = f"sp_{args.backend}_{args.model}_{args.estimator}{args.tag}"
    common.check_outputs(args, name)  # before training: no silent overwrite
    common.set_threads(args)
    train_set = load_mnist(args.data, args.binarize, "train")
    test_set = load_mnist(args.data, args.binarize, "test")
    args.num_data = len(train_set)
    rng = np.random.default_rng(args.seed)
    bk = common.get_backend(args.backend, init_params(args, train_set.probs, rng))
    model, guide = make_model_and_guide(bk, args, train_set.mean()[:HALF].astype(np.float32))
    elbo = common.make_elbo(args.backend, args.estimator, num_samples=args.num_samples)
    common.set_seeds(args.backend, args.seed)
    num_data = float(len(train_set))
    example = make_args(bk, train_set.binarized(np.arange(args.batch_size), rng))[:3] + (num_data,)
    trainer = common.make_trainer(
        bk, model, guide, elbo, example, args.seed, num_data, optim="adam", lr=args.lr,
        betas=(0.9, args.beta2))
    bound = common.make_bound(bk, model, guide, make_args)
    x_eval = test_set.fixed_binarization(args.eval_size, args.test_seed)
    K = args.eval_samples

    batches = train_set.batches(args.batch_size, np.random.default_rng(args.seed + 1000),
                                args.num_steps)

    def step_args(batch):
        idx, x = batch
        return make_args(bk, x)[:2] + (bk.asarray(idx), num_data)

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
        f"Structured prediction {args.model} ({Path(args.data).stem}, {args.binarize}), "
        f"{args.estimator} [{args.backend}], batch {args.batch_size}, lr {args.lr:g}",
        f"test {K}-sample bound ({len(x_eval)} examples)",
        final=(final, len(x_test)),
        ylabel="log p(lower half | upper half), nats",
    )
    steps = len(history)
    result = {
        "example": "structured_prediction", "backend": args.backend, "model": args.model,
        "estimator": args.estimator, "preset": args.preset, "steps": steps,
        "batch_size": args.batch_size, "lr": args.lr, "beta2": args.beta2, "act": args.act,
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


if __name__ == "__main__":
    main()
