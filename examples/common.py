"""
Helpers shared by the examples (``sbn.py``, ``structured_prediction.py``,
``categorical_vae.py``, ``gradient_variance.py``) and ``benchmarks/reproduce.py``:

* :func:`limit_threads` (call before importing torch / jax: ``--threads``
  intra-op threads, the libraries' choice by default; see :data:`DEFAULT_THREADS`),
* the backend layer (``backends.py``, re-exported here: :func:`get_backend`,
  :func:`linear_init`, :func:`mlp_init`, :func:`mlp`) so that one model / guide
  definition runs under Pyro and NumPyro,
* the estimator registry (:func:`make_elbo`: ``--estimator`` name -> class of
  the chosen backend, with a clear error when the backend lacks it),
* trainers (:class:`PyroTrainer`, :class:`NumPyroTrainer`: one optimizer step
  per call, optional second optimizer for a parameter group),
* the test bound (:func:`make_bound`: the K-sample importance-weighted bound per
  example, chunked over data and samples; ``iwae_bound`` of the backend's
  package when it has one),
* the command-line arguments shared by the examples and the presets,
* the run reporting (``reporting.py``, re-exported here): the training loop with
  tqdm (:func:`train`), the plot (:func:`save_plot`), the drift check and the
  final JSON line (:func:`finish`).
"""

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# An installed package wins; otherwise use the checkout this file is in.
sys.path.append(str(ROOT))

# the backend layer and the run reporting live in their own modules; the examples use
# them through this one (``common.get_backend``, ``common.train``, ...)
from backends import (NumPyroBackend, PyroBackend, _JaxOps, _TorchOps,  # noqa: E402,F401
                      get_backend, linear_init, mlp, mlp_init)
from reporting import (check_outputs, drift_summary, finish, mean_last,  # noqa: E402,F401
                       print_summary, save_plot, train)


#: the default of ``--threads``: 0, what torch / XLA pick (one thread per core).
#: Small-batch steps are latency-bound: on a busy or shared machine, or with
#: several runs at once (``benchmarks/reproduce.py --jobs 2`` passes ``--threads
#: 1``), pass ``--threads 1``: torch's one thread per core made Pyro steps about
#: 10x slower there (262.7 vs 25.5 ms/step measured on a busy 2-core machine).
DEFAULT_THREADS = 0


def threads_from_argv(argv=None, default=DEFAULT_THREADS):
    """The ``--threads N`` of the command line (read before torch / jax import)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        try:
            if a == "--threads":
                return int(argv[i + 1])
            if a.startswith("--threads="):
                return int(a.split("=", 1)[1])
        except (IndexError, ValueError):
            break  # argparse reports it
    return default


def limit_threads(n=None, platform="cpu"):
    """
    ``n`` intra-op threads for torch / XLA / BLAS (call before importing them;
    default: ``--threads`` of the command line, else :data:`DEFAULT_THREADS`).
    ``n = 0``: leave the thread counts to the libraries. ``platform``: the
    default ``JAX_PLATFORMS`` (None: let JAX pick, e.g. a GPU). Variables the
    user has set win.
    """
    n = threads_from_argv() if n is None else n
    if n > 0:
        os.environ.setdefault(
            "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={n}"
        )
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(n))
    if platform is not None:
        os.environ.setdefault("JAX_PLATFORMS", platform)


def set_threads(args):
    """Apply ``--threads`` to torch if it is loaded (``torch.set_num_threads``;
    the environment set by :func:`limit_threads` covers XLA and BLAS)."""
    n = getattr(args, "threads", DEFAULT_THREADS)
    torch = sys.modules.get("torch")
    if n > 0 and torch is not None:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# estimators


#: --estimator name -> (class name, kind); kind: "pair" (one antithetic pair or
#: 2 samples), "multi" (K-sample bound), "st" (straight-through family), "tg"
ESTIMATORS = {
    "disarm": "DisARM_ELBO",
    "arm": "ARM_ELBO",
    "rloo": "RLOO_ELBO",
    "vimco": "VIMCO",
    "local_disarm": "LocalDisARM_IWAE",
    "rebar": "REBAR_ELBO",
    "relax": "RELAX_ELBO",
    "tracegraph": "TraceGraph_ELBO",
    "st": "ST_ELBO",
    "gumbel_st": "GumbelSoftmaxST_ELBO",
    "gumbel_rao": "GumbelRao_ELBO",
    "reinmax": "ReinMax_ELBO",
    "reinmax_rao": "ReinMaxRao_ELBO",
    "reinmax_cv": "ReinMaxCV_ELBO",
}
BINARY_ESTIMATORS = ("disarm", "arm", "rloo", "vimco", "local_disarm", "rebar", "relax", "tracegraph")
CATEGORICAL_ESTIMATORS = ("st", "gumbel_st", "gumbel_rao", "reinmax", "reinmax_rao", "reinmax_cv",
                          "rloo", "tracegraph")
TEMPERATURE_ESTIMATORS = ("st", "gumbel_st", "gumbel_rao", "reinmax", "reinmax_rao", "reinmax_cv")


def available_estimators(backend, names):
    """The names among ``names`` whose class exists in ``backend``'s package."""
    return [n for n in names if _estimator_class(backend, n) is not None]


def _estimator_class(backend, name):
    cls_name = ESTIMATORS[name]
    if name == "tracegraph":
        if backend == "pyro":
            import pyro.infer

            return pyro.infer.TraceGraph_ELBO
        return _numpyro_tracegraph()
    mod = __import__("pyro_binary_grads" if backend == "pyro" else "numpyro_binary_grads")
    return getattr(mod, cls_name, None)


def make_elbo(backend, name, *, num_samples=2, temperature=None, eta=None, rao_samples=None,
              max_plate_nesting=1):
    """
    The ELBO object for ``--estimator name`` in ``backend``. ``num_samples``:
    the evaluations per step for the multi-sample estimators (RLOO and VIMCO use
    ``num_samples`` independent samples, local DisARM ``num_samples // 2``
    antithetic pairs: equal cost, as in the DisARM paper).
    """
    if name not in ESTIMATORS:
        raise SystemExit(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    cls = _estimator_class(backend, name)
    if cls is None:
        have = available_estimators(backend, list(ESTIMATORS))
        raise SystemExit(
            f"--estimator {name}: {ESTIMATORS[name]} does not exist in the {backend} backend "
            f"({'pyro_binary_grads' if backend == 'pyro' else 'numpyro_binary_grads'}) of "
            f"this checkout. Available there: {', '.join(have)}."
        )
    kw = {}
    if backend == "pyro":
        kw["max_plate_nesting"] = max_plate_nesting
    if name in ("rloo", "vimco"):
        kw["num_samples"] = num_samples
    elif name == "local_disarm":
        kw["num_pairs"] = max(1, num_samples // 2)
    if name in TEMPERATURE_ESTIMATORS and temperature is not None and name != "st":
        kw["temperature"] = temperature
    if name == "st" and temperature is not None:
        kw["temperature"] = temperature
    if name == "reinmax_cv" and eta is not None:
        kw["eta"] = eta
    if name in ("gumbel_rao", "reinmax_rao", "reinmax_cv") and rao_samples is not None:
        kw["num_samples"] = rao_samples
    return cls(**kw)


def _numpyro_tracegraph():
    """NumPyro's ``TraceGraph_ELBO`` for the examples' programs, evaluated where
    it is right.

    NumPyro's ``TraceGraph_ELBO`` (0.22) scales its score term twice by the
    subsample scale :math:`s = N/B`: the guide's log-probability and its
    downstream cost are both scaled (the bug Pyro fixed in pyro-ppl/pyro#531),
    so its discrete-site gradient is :math:`s` times too large (1200x for an
    SBN on MNIST at batch 50; ``tests/numpyro/test_numpyro_unbiased.py``,
    ``test_subsample_tracegraph_wrong_ours_right``). Every site of the
    examples' programs ``(..., idx, num_data)`` is in the data plate, so their
    ELBO at scale :math:`s` is :math:`s` times the ELBO at scale 1, where it
    is right: the loss is evaluated with ``num_data = B`` and multiplied by
    :math:`s`."""
    import numpyro.infer

    class ScaleOnceTraceGraph_ELBO(numpyro.infer.TraceGraph_ELBO):
        def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
            *rest, idx, num_data = args
            B = idx.shape[0]
            return (num_data / B) * super().loss(rng_key, param_map, model, guide, *rest,
                                                 idx, B, **kwargs)

    return ScaleOnceTraceGraph_ELBO


# ---------------------------------------------------------------------------
# trainers


class PyroTrainer:
    """
    ``step(*args)`` = one ``elbo.loss_and_grads`` and optimizer step; returns the
    loss (a float). Parameters named in ``second_group`` (e.g. the prior logits,
    DisARM's SGD at lr 1e-2) get ``second_optim`` instead of ``optim``.
    """

    def __init__(self, bk, model, guide, elbo, optim="adam", lr=1e-3, betas=(0.9, 0.999),
                 second_group=(), second_optim=None, second_lr=None, grad_scale=1.0):
        self.model, self.guide, self.elbo = model, guide, elbo
        params = {k: bk.pyro.param(k).unconstrained() for k in bk.names}
        self._setup_optim(bk, params, optim, lr, betas, second_group, second_optim,
                          second_lr, grad_scale)
        # REBAR/RELAX's adapted parameters (declared by elbo.wrap_guide): 10x the
        # learning rate, as REBAR App. G does for eta and its baselines
        store = bk.pyro.get_param_store()
        adapted = [store._params[k] for k in store.keys() if k.startswith("_bg_")]
        if adapted:
            self.optims.append(_torch_optim(optim, adapted, ADAPTED_LR_FACTOR * lr, betas))
        self.params += adapted

    def _setup_optim(self, bk, params, optim, lr, betas, second_group, second_optim,
                     second_lr, grad_scale):
        """One optimizer for ``params`` (a dict), a second one for those named in
        ``second_group``."""
        self.bk, self.grad_scale = bk, grad_scale
        main = [p for k, p in params.items() if k not in second_group]
        other = [p for k, p in params.items() if k in second_group]
        self.optims = [_torch_optim(optim, main, lr, betas)]
        if other:
            self.optims.append(_torch_optim(second_optim or optim, other, second_lr or lr, betas))
        self.params = list(params.values())

    def step(self, *args):
        loss = self.elbo.loss_and_grads(self.model, self.guide, *args)
        self._update()
        return float(loss)

    def _update(self):
        """Scale the gradients by ``grad_scale``, step every optimizer, clear."""
        if self.grad_scale != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)
        for o in self.optims:
            o.step()
            o.zero_grad(set_to_none=True)

    def snapshot(self):
        return {k: v.detach().clone() for k, v in self.bk.params().items()}

    def adapted(self):
        """REBAR/RELAX's adapted temperature and eta (``_bg_<site>_temperature``,
        ``_bg_<site>_eta``), constrained, as floats; not RELAX's network."""
        return _adapted_scalars({k: v.detach() for k, v in
                                 self.bk.pyro.get_param_store().items()})


#: learning-rate factor of REBAR/RELAX's adapted parameters
ADAPTED_LR_FACTOR = 10.0


def _torch_optim(name, params, lr, betas):
    import torch

    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(name)


def _optax_optim(name, lr, betas):
    import optax

    if name == "adam":
        return optax.adam(lr, b1=betas[0], b2=betas[1])
    if name == "radam":
        return optax.radam(lr, b1=betas[0], b2=betas[1])
    if name == "sgd":
        return optax.sgd(lr)
    raise ValueError(name)


class NumPyroTrainer:
    """
    ``numpyro.infer.SVI`` with an optax optimizer (``optax.multi_transform`` when
    a second parameter group is given), ``svi.update`` under ``jax.jit``;
    ``step(*args)`` returns the loss (a float).
    """

    def __init__(self, bk, model, guide, elbo, example_args, seed=0, optim="adam", lr=1e-3,
                 betas=(0.9, 0.999), second_group=(), second_optim=None, second_lr=None,
                 grad_scale=1.0):
        import jax
        import optax
        from numpyro.infer import SVI

        self.bk, self.model, self.guide = bk, model, guide
        tx = _optax_optim(optim, lr, betas)
        if second_group or getattr(elbo, "wrap_guide", None) is not None:
            group = set(second_group)
            tx = optax.multi_transform(
                {"main": tx,
                 "second": _optax_optim(second_optim or optim, second_lr or lr, betas),
                 "adapted": _optax_optim(optim, ADAPTED_LR_FACTOR * lr, betas)},
                lambda params: {
                    k: ("second" if k in group else "adapted" if k.startswith("_bg_") else "main")
                    for k in params
                },
            )
        if grad_scale != 1.0:
            tx = optax.chain(optax.scale(grad_scale), tx)
        self.svi = SVI(model, guide, tx, elbo)
        self.state = self.svi.init(jax.random.PRNGKey(seed), *example_args)
        self._update = jax.jit(self.svi.update)

    def step(self, *args):
        self.state, loss = self._update(self.state, *args)
        return float(loss)

    def snapshot(self):
        return self.svi.get_params(self.state)

    def adapted(self):
        """As :meth:`PyroTrainer.adapted`."""
        return _adapted_scalars(self.snapshot())


def _adapted_scalars(params):
    """The scalar ``_bg_*_temperature`` / ``_bg_*_eta`` entries of ``params`` as floats
    (RELAX's control-variate network is a nested dict in NumPyro and named
    ``_bg_<site>_control_variate$$$...`` in Pyro: left out)."""
    def numel(v):  # torch: .numel(); JAX/NumPy: .size; a nested dict: neither
        return v.numel() if callable(getattr(v, "numel", None)) else getattr(v, "size", None)

    return {k: float(v) for k, v in params.items()
            if k.startswith("_bg_") and k.endswith(("_temperature", "_eta")) and numel(v) == 1}


def make_trainer(bk, model, guide, elbo, example_args, seed, num_data, **optim_kw):
    """
    The backend's trainer. The loss is the ELBO of the data set (minibatch scaled by
    ``num_data / batch``); gradients are divided by ``num_data`` before the
    optimizer, i.e. the optimizers see the per-example loss, as in the papers
    (this matters for SGD, for RAdam's first un-adapted steps and for Adam's eps).
    """
    optim_kw.setdefault("grad_scale", 1.0 / num_data)
    if getattr(elbo, "wrap_guide", None) is not None:  # REBAR, RELAX: adapted parameters
        guide = elbo.wrap_guide(guide)
        if bk.name == "pyro":
            import pyro.poutine as poutine

            with poutine.block():
                guide(*example_args)  # declares them in the param store
    if bk.name == "pyro":
        return PyroTrainer(bk, model, guide, elbo, **optim_kw)
    return NumPyroTrainer(bk, model, guide, elbo, example_args, seed=seed, **optim_kw)


# ---------------------------------------------------------------------------
# the K-sample test bound


def make_bound(bk, model, guide, make_args, chunk=500, sample_chunk=10):
    """
    ``bound(trainer, data_list, K) -> mean over examples`` of the per-example
    K-sample importance-weighted bound ``log 1/K sum_k p(x, z_k) / q(z_k | x)``
    (``K = 1``: a one-sample ELBO estimate). ``data_list`` is a tuple of arrays
    whose first axis is the example; ``make_args(bk, *chunk_arrays)`` turns a
    chunk into the model's arguments with ``num_data = len(chunk)`` (scale 1).
    Data chunks of ``chunk`` examples, samples ``sample_chunk`` at a time.
    """
    if bk.name == "pyro":
        return _pyro_bound(bk, model, guide, make_args, chunk, sample_chunk)
    return _numpyro_bound(bk, model, guide, make_args, chunk, sample_chunk)


def _pyro_bound(bk, model, guide, make_args, chunk, sample_chunk):
    import torch
    from pyro_binary_grads import iwae_bound

    def bound(trainer, arrays, K):
        total, n = 0.0, len(arrays[0])
        with torch.no_grad():
            for s in range(0, n, chunk):
                args = make_args(bk, *(a[s : s + chunk] for a in arrays))
                total += iwae_bound(model, guide, *args, num_samples=K,
                                    chunk_size=min(K, sample_chunk), max_plate_nesting=1)
        return total / n

    return bound


def _numpyro_bound(bk, model, guide, make_args, chunk, sample_chunk):
    """Per-example log-weights by tracing guide and replaying the model, vmapped
    over sample keys, combined exactly with a running logsumexp (jitted)."""
    import jax
    import jax.numpy as jnp
    from numpyro import handlers

    def log_weights(params, key, args):
        g = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), key)).get_trace(*args)
        m = handlers.trace(
            handlers.replay(handlers.substitute(model, data=params), g)
        ).get_trace(*args)
        f = 0.0
        for tr, sign in ((m, 1.0), (g, -1.0)):
            for site in tr.values():
                if site["type"] == "sample":
                    f = f + sign * site["fn"].log_prob(site["value"])
        return f  # (N,): every site is inside the data plate

    @jax.jit
    def chunk_lse(params, keys, args):
        fs = jax.vmap(lambda k: log_weights(params, k, args))(keys)
        return jax.nn.logsumexp(fs, 0)

    key_box = [jax.random.PRNGKey(12345)]
    try:
        from numpyro_binary_grads import iwae_bound
    except ImportError:  # older checkout: the fallback below
        iwae_bound = None

    def bound(trainer, arrays, K):
        params = trainer.snapshot()
        if iwae_bound is not None:
            total, n = 0.0, len(arrays[0])
            for s in range(0, n, chunk):
                args = make_args(bk, *(a[s : s + chunk] for a in arrays))
                key_box[0], sub = jax.random.split(key_box[0])
                total += float(iwae_bound(sub, params, model, guide, *args, num_samples=K,
                                          chunk_size=min(K, sample_chunk)))
            return total / n
        total, n = 0.0, len(arrays[0])
        for s in range(0, n, chunk):
            args = make_args(bk, *(a[s : s + chunk] for a in arrays))
            acc, done = None, 0
            while done < K:
                k = min(sample_chunk, K - done)
                key_box[0], sub = jax.random.split(key_box[0])
                lse = chunk_lse(params, jax.random.split(sub, k), args)
                acc = lse if acc is None else jnp.logaddexp(acc, lse)
                done += k
            total += float(jnp.sum(acc - math.log(K)))
        return total / n

    return bound


# ---------------------------------------------------------------------------
# arguments


def add_common_args(p, default_out, estimators, default_estimator):
    p.add_argument("--backend", choices=("pyro", "numpyro"), default="pyro")
    p.add_argument("--estimator", choices=estimators, default=default_estimator)
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(default_out))
    p.add_argument("--num-samples", type=int, default=2,
                   help="evaluations per step of RLOO / VIMCO (samples) and local DisARM "
                        "(num_samples // 2 pairs) (default %(default)s: the cost of one "
                        "antithetic pair)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations of the test bound (default: a tenth of "
                        "--num-steps, at most 10000)")
    p.add_argument("--eval-size", type=int, default=1000,
                   help="test examples (a seeded random subset) of the periodic evaluation")
    p.add_argument("--eval-samples", type=int, default=100,
                   help="K of the K-sample test bound (default %(default)s)")
    p.add_argument("--final-eval-size", type=int, default=None,
                   help="test examples of the final evaluation (default: the full test set)")
    p.add_argument("--test-seed", type=int, default=0,
                   help="seed of the evaluation subset and of its fixed binarization")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="save a checkpoint every STEPS steps (default 0: never; "
                        "examples/checkpoint.py)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file (default: <out>/<run>.ckpt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint if there is one (same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the plot and JSON of an earlier run with the same name "
                        "(without it the run refuses to start)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="intra-op threads of torch / XLA (default %(default)s: the library's "
                        "choice, one per core; 1 is fastest for small batches on a busy or "
                        "shared machine or with several runs at once)")
    return p


DATASETS = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz",
            "binarized_mnist": "binarized_mnist.npz"}


def add_sbn_args(p, presets, models):
    """Arguments shared by sbn.py and structured_prediction.py."""
    p.add_argument("--preset", choices=tuple(presets), default="none")
    p.add_argument("--model", choices=models, default="linear1")
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None)
    p.add_argument("--data", type=Path, default=None,
                   help="the .npz file (default: shared/data/<dataset>.npz)")
    p.add_argument("--binarize", choices=("dynamic", "static", "threshold"), default=None,
                   help="default: dynamic for mnist / fashion_mnist, static for binarized_mnist")
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--beta2", type=float, default=None)
    p.add_argument("--prior-optim", choices=("adam", "sgd"), default=None,
                   help="optimizer of the prior logits (sgd: on the per-example loss)")
    p.add_argument("--prior-lr", type=float, default=None)
    p.add_argument("--act", choices=("tanh", "leaky_relu"), default=None)
    p.add_argument("--pm1", action=argparse.BooleanOptionalAction, default=None,
                   help="binary variables as {-1, 1} inside the networks")


def apply_preset(args, presets):
    """Fill unset arguments from ``presets[args.preset]``; resolve ``--data``."""
    from data import DATA_DIR

    preset = presets[args.preset]
    if args.preset == "rebar" and args.model == "nonlinear" and args.lr is None:
        args.lr = 1e-4  # the nonlinear grid of REBAR is {3e-5, 1e-4}
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.data is None:
        args.data = DATA_DIR / DATASETS[args.dataset]
    if args.binarize is None:
        args.binarize = "static" if "binarized" in Path(args.data).name else "dynamic"
    return args


def set_seeds(backend, seed):
    if backend == "pyro":
        import pyro
        import torch

        torch.manual_seed(seed)
        pyro.set_rng_seed(seed)
        pyro.enable_validation(False)


def eval_subset(n_total, n, seed):
    """Sorted seeded random subset of ``n`` row indices (all rows if n >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))
