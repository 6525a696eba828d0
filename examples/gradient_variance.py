"""
Gradient-variance figure in the style of the DisARM / REBAR papers: the log10
variance of the encoder (inference network) gradient estimate over training, for
DisARM, ARM, RLOO (2 samples), TraceGraph_ELBO and REBAR (its temperature and eta
adapted along the trajectory by their own variance-gradient steps),
on the linear one-layer SBN (``examples/sbn.py``'s model and presets).

One training trajectory (``--train-estimator``, DisARM by default) is followed; at
every ``--every`` steps each estimator draws ``--draws`` gradient estimates on one
fixed minibatch at the current parameters; the figure shows the mean over encoder
parameters of the per-parameter variance (per-example loss), log10. (The papers
follow each estimator's own trajectory; at equal parameters the comparison is of
the estimators alone.)

    python examples/gradient_variance.py --num-steps 3000 --every 300 \
        --out-png docs/results/gradient_variance_sbn_linear1.png
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import common  # noqa: E402

common.limit_threads()

import sbn  # noqa: E402
from data import load_mnist  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--estimators", nargs="*",
                   default=["disarm", "arm", "rloo", "tracegraph", "rebar"])
    p.add_argument("--train-estimator", default="disarm")
    p.add_argument("--preset", default="none", choices=tuple(sbn.PRESETS))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/gradient_variance"))
    p.add_argument("--out-png", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torch

    sargs = ["--backend", "pyro", "--model", "linear1", "--estimator", args.train_estimator,
             "--preset", args.preset, "--seed", str(args.seed)]
    if args.batch_size:
        sargs += ["--batch-size", str(args.batch_size)]
    if args.lr:
        sargs += ["--lr", str(args.lr)]
    sa = sbn.parse_args(sargs)
    train_set = load_mnist(sa.data, sa.binarize, "train")
    bk, model, guide, trainer = sbn.build(sa, train_set)
    num_data = float(len(train_set))
    names = [e for e in args.estimators
             if e in common.available_estimators("pyro", [e])]
    skipped = [e for e in args.estimators if e not in names]
    elbos = {e: common.make_elbo("pyro", e, num_samples=2) for e in names}
    enc = [bk.pyro.param(k).unconstrained() for k in ("enc0_W", "enc0_b")]
    xb = torch.as_tensor(train_set.fixed_binarization(sa.batch_size, seed=123))
    idx = torch.arange(sa.batch_size)
    # REBAR / RELAX adapt their temperature, eta (and network) along the
    # trajectory: one variance-gradient step of their own per training step
    guides = {e: guide for e in names}
    adapt = {}
    store = bk.pyro.get_param_store()
    for e, elbo in elbos.items():
        if getattr(elbo, "wrap_guide", None) is None:
            continue
        before = set(store.keys())
        guides[e] = elbo.wrap_guide(guide)
        with bk.pyro.poutine.block():
            guides[e](xb, idx, float(len(train_set)))
        psi = [store._params[k] for k in store.keys() if k not in before]
        adapt[e] = (psi, torch.optim.Adam(psi, lr=common.ADAPTED_LR_FACTOR * sa.lr,
                                          betas=(0.9, sa.beta2)))

    def log_variance():
        out = {}
        for e, elbo in elbos.items():
            grads = []
            t = time.perf_counter()
            for _ in range(args.draws):
                elbo.loss_and_grads(model, guides[e], xb, idx, num_data)
                grads.append(torch.cat([q.grad.reshape(-1) for q in enc]) / num_data)
                for q in trainer.params + [p for ps, _ in adapt.values() for p in ps]:
                    q.grad = None
            g = torch.stack(grads).double()
            out[e] = {"log10_var": float(torch.log10(g.var(0).mean())),
                      "ms_per_draw": 1000 * (time.perf_counter() - t) / args.draws}
        return out

    from tqdm import tqdm

    rng = np.random.default_rng(args.seed + 1000)
    curve = [(0, log_variance())]
    t0 = time.perf_counter()
    bar = tqdm(train_set.batches(sa.batch_size, rng, args.num_steps), total=args.num_steps,
               disable=args.no_progress, desc="train " + args.train_estimator, mininterval=2)
    elbo_hist = []
    for step, (i, x) in enumerate(bar, 1):
        loss = trainer.step(torch.as_tensor(x), torch.as_tensor(i), num_data)
        elbo_hist.append(-loss / num_data)
        for e, (psi, opt) in adapt.items():
            elbos[e].loss_and_grads(model, guides[e], torch.as_tensor(x), torch.as_tensor(i),
                                    num_data)
            opt.step()
            for q in trainer.params + psi:
                q.grad = None
        if step % args.every == 0 or step == args.num_steps:
            curve.append((step, log_variance()))
            bar.set_postfix({e: f"{v['log10_var']:.2f}" for e, v in curve[-1][1].items()})
    bar.close()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"disarm": "DisARM", "arm": "ARM", "rloo": "RLOO (2 samples)",
              "tracegraph": "TraceGraph_ELBO", "rebar": "REBAR (adapted)",
              "relax": "RELAX"}
    for e in names:
        ax.plot([c[0] for c in curve], [c[1][e]["log10_var"] for c in curve], "o-", ms=3,
                label=labels.get(e, e))
    ax.set_xlabel(f"training step ({args.train_estimator} trajectory)")
    ax.set_ylabel("log10 variance of encoder gradient\n(mean over parameters, per example)")
    ax.set_title(f"Linear SBN 784-200 ({Path(sa.data).stem}, {sa.binarize}), batch "
                 f"{sa.batch_size}, {args.draws} draws per point", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out_png or args.out / "gradient_variance.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    result = {"example": "gradient_variance", "estimators": names, "skipped": skipped,
              "train_estimator": args.train_estimator, "steps": args.num_steps,
              "batch_size": sa.batch_size, "lr": sa.lr, "draws": args.draws,
              "final": curve[-1][1], "initial": curve[0][1],
              "train_elbo_last10pct": float(np.mean(elbo_hist[-max(1, len(elbo_hist) // 10):])),
              "wall_time_s": time.perf_counter() - t0, "plot": str(png)}
    with open(args.out / "gradient_variance.json", "w") as fh:
        json.dump({**result, "curve": curve}, fh)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
