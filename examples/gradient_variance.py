"""
Gradient-variance figure in the style of the DisARM / REBAR papers: the log10
variance of the encoder (inference network) gradient estimate over training, for
DisARM, ARM, RLOO (2 samples), TraceGraph_ELBO and REBAR (its temperature and eta
adapted along the trajectory by their own variance-gradient steps),
on the linear one-layer SBN (``examples/sbn.py``'s model and presets).

``--backend pyro`` (default) or ``numpyro``. One training trajectory
(``--train-estimator``, DisARM by default) is followed; at
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
    p.add_argument("--backend", choices=("pyro", "numpyro"), default="pyro")
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS,
                   help="intra-op threads (default %(default)s; 0: the library's choice)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the JSON / plot of an earlier run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    png = args.out_png or args.out / f"gradient_variance_{args.backend}.png"
    for f in (png, args.out / f"gradient_variance_{args.backend}.json"):
        if f.exists() and not args.overwrite:
            raise SystemExit(f"{f} exists (an earlier run). Pass --overwrite to replace it, "
                             "or --out DIR / --out-png FILE to keep both.")

    sargs = ["--backend", args.backend, "--model", "linear1", "--estimator",
             args.train_estimator, "--preset", args.preset, "--seed", str(args.seed),
             "--threads", str(args.threads)]
    if args.batch_size:
        sargs += ["--batch-size", str(args.batch_size)]
    if args.lr:
        sargs += ["--lr", str(args.lr)]
    sa = sbn.parse_args(sargs)
    common.set_threads(sa)
    train_set = load_mnist(sa.data, sa.binarize, "train")
    bk, model, guide, trainer = sbn.build(sa, train_set)
    num_data = float(len(train_set))
    names = [e for e in args.estimators
             if e in common.available_estimators(args.backend, [e])]
    skipped = [e for e in args.estimators if e not in names]
    elbos = {e: common.make_elbo(args.backend, e, num_samples=2) for e in names}
    xb = train_set.fixed_binarization(sa.batch_size, seed=123)
    probe_cls = PyroProbe if args.backend == "pyro" else NumPyroProbe
    probe = probe_cls(bk, model, guide, trainer, elbos, xb, num_data, sa, args.seed)

    from tqdm import tqdm

    rng = np.random.default_rng(args.seed + 1000)
    curve = [(0, probe.log_variance(args.draws))]
    t0 = time.perf_counter()
    bar = tqdm(train_set.batches(sa.batch_size, rng, args.num_steps), total=args.num_steps,
               disable=args.no_progress, desc="train " + args.train_estimator, mininterval=2)
    elbo_hist = []
    for step, (i, x) in enumerate(bar, 1):
        args_t = (bk.asarray(x), bk.asarray(i), num_data)
        loss = trainer.step(*args_t)
        elbo_hist.append(-loss / num_data)
        probe.adapt(args_t)
        if step % args.every == 0 or step == args.num_steps:
            curve.append((step, probe.log_variance(args.draws)))
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
    ax.set_title(f"Linear SBN 784-200 ({Path(sa.data).stem}, {sa.binarize}) [{args.backend}], batch "
                 f"{sa.batch_size}, {args.draws} draws per point", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    result = {"example": "gradient_variance", "backend": args.backend, "estimators": names, "skipped": skipped,
              "train_estimator": args.train_estimator, "steps": args.num_steps,
              "batch_size": sa.batch_size, "lr": sa.lr, "draws": args.draws,
              "final": curve[-1][1], "initial": curve[0][1],
              "train_elbo_last10pct": float(np.mean(elbo_hist[-max(1, len(elbo_hist) // 10):])),
              "wall_time_s": time.perf_counter() - t0, "plot": str(png)}
    with open(args.out / f"gradient_variance_{args.backend}.json", "w") as fh:
        json.dump({**result, "curve": curve}, fh)
    print(f"gradient_variance [{args.backend}] | {args.num_steps} steps | final log10 variance: "
          + ", ".join(f"{e} {v['log10_var']:.2f}" for e, v in curve[-1][1].items())
          + f" | plot {png}", flush=True)
    print(json.dumps(result))
    return result


class PyroProbe:
    """Encoder-gradient variance of each estimator at the trainer's current
    parameters; REBAR / RELAX adapt their temperature, eta (and network) along
    the trajectory: one variance-gradient step of their own per training step."""

    def __init__(self, bk, model, guide, trainer, elbos, xb, num_data, sa, seed):
        import torch

        self.torch, self.bk, self.model, self.trainer = torch, bk, model, trainer
        self.elbos, self.num_data = elbos, num_data
        self.enc = [bk.pyro.param(k).unconstrained() for k in ("enc0_W", "enc0_b")]
        self.xb = torch.as_tensor(xb)
        self.idx = torch.arange(len(xb))
        self.guides = {e: guide for e in elbos}
        self.adapted = {}
        store = bk.pyro.get_param_store()
        for e, elbo in elbos.items():
            if getattr(elbo, "wrap_guide", None) is None:
                continue
            before = set(store.keys())
            self.guides[e] = elbo.wrap_guide(guide)
            with bk.pyro.poutine.block():
                self.guides[e](self.xb, self.idx, num_data)
            psi = [store._params[k] for k in store.keys() if k not in before]
            self.adapted[e] = (psi, torch.optim.Adam(psi, lr=common.ADAPTED_LR_FACTOR * sa.lr,
                                                     betas=(0.9, sa.beta2)))

    def _zero(self):
        for q in self.trainer.params + [p for ps, _ in self.adapted.values() for p in ps]:
            q.grad = None

    def log_variance(self, draws):
        torch, out = self.torch, {}
        for e, elbo in self.elbos.items():
            grads = []
            t = time.perf_counter()
            for _ in range(draws):
                elbo.loss_and_grads(self.model, self.guides[e], self.xb, self.idx, self.num_data)
                grads.append(torch.cat([q.grad.reshape(-1) for q in self.enc]) / self.num_data)
                self._zero()
            g = torch.stack(grads).double()
            out[e] = {"log10_var": float(torch.log10(g.var(0).mean())),
                      "ms_per_draw": 1000 * (time.perf_counter() - t) / draws}
        return out

    def adapt(self, step_args):
        for e, (psi, opt) in self.adapted.items():
            self.elbos[e].loss_and_grads(self.model, self.guides[e], *step_args)
            opt.step()
            self._zero()


class NumPyroProbe:
    """As :class:`PyroProbe`, for NumPyro: ``draws`` gradients of
    ``elbo.loss`` (vmapped over keys, jitted) at the trainer's current
    parameters; REBAR / RELAX's adapted parameters (``_bg_*``) take one Adam step
    on their unconstrained values per training step."""

    def __init__(self, bk, model, guide, trainer, elbos, xb, num_data, sa, seed):
        import jax
        import optax
        from numpyro import handlers
        from numpyro.infer.util import transform_fn

        self.jax, self.model, self.trainer, self.elbos = jax, model, trainer, elbos
        self.num_data = num_data
        self.xb, self.idx = bk.asarray(xb), bk.asarray(np.arange(len(xb)))
        self.key = jax.random.PRNGKey(seed + 7)
        self.guides, self.adapted, self.fns = {}, {}, {}
        base = trainer.snapshot()
        for e, elbo in elbos.items():
            g = guide
            if getattr(elbo, "wrap_guide", None) is not None:
                g = elbo.wrap_guide(guide)
                tr = handlers.trace(handlers.seed(g, 0)).get_trace(self.xb, self.idx, num_data)
                sites = {k: s for k, s in tr.items()
                         if s["type"] == "param" and k.startswith("_bg_") and k not in base}
                constraints = {k: s["kwargs"].get("constraint") for k, s in sites.items()}
                from numpyro.distributions import biject_to, constraints as C

                transforms = {k: biject_to(c or C.real) for k, c in constraints.items()}
                init = {k: transforms[k].inv(s["value"]) for k, s in sites.items()}
                opt = optax.adam(common.ADAPTED_LR_FACTOR * sa.lr, b2=sa.beta2)
                self.adapted[e] = [init, opt.init(init), opt, transforms]

                def psi_grad(psi_u, params, key, x, i, n, elbo=elbo, g=g, transforms=transforms):
                    def loss(pu):
                        return elbo.loss(key, {**params, **transform_fn(transforms, pu)},
                                         model, g, x, i, n)
                    return jax.grad(loss)(psi_u)

                self.adapted[e].append(jax.jit(psi_grad))
            self.guides[e] = g

            def draws_fn(params, keys, x, i, n, elbo=elbo, g=g):
                grad = jax.grad(lambda p, k: elbo.loss(k, p, model, g, x, i, n))
                gs = jax.vmap(lambda k: grad(params, k))(keys)
                return jax.numpy.concatenate(
                    [gs[k].reshape(len(keys), -1) for k in ("enc0_W", "enc0_b")], 1)

            self.fns[e] = jax.jit(draws_fn)
        self.transform_fn = transform_fn

    def _params(self, e):
        params = dict(self.trainer.snapshot())
        if e in self.adapted:
            psi_u, _, _, transforms, _ = self.adapted[e]
            params.update(self.transform_fn(transforms, psi_u))
        return params

    def log_variance(self, draws):
        jax, out = self.jax, {}
        for e in self.elbos:
            self.key, sub = jax.random.split(self.key)
            keys = jax.random.split(sub, draws)
            t = time.perf_counter()
            g = np.asarray(self.fns[e](self._params(e), keys, self.xb, self.idx, self.num_data),
                           np.float64) / self.num_data
            out[e] = {"log10_var": float(np.log10(g.var(0, ddof=1).mean())),
                      "ms_per_draw": 1000 * (time.perf_counter() - t) / draws}
        return out

    def adapt(self, step_args):
        import optax

        for e, state in self.adapted.items():
            psi_u, opt_state, opt, transforms, grad_fn = state
            self.key, sub = self.jax.random.split(self.key)
            params = self.trainer.snapshot()
            gr = grad_fn(psi_u, params, sub, *step_args)
            updates, opt_state = opt.update(gr, opt_state, psi_u)
            state[0], state[1] = optax.apply_updates(psi_u, updates), opt_state


if __name__ == "__main__":
    main()
