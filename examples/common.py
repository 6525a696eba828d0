"""
Helpers shared by the examples (``sbn.py``, ``structured_prediction.py``,
``categorical_vae.py``, ``gradient_variance.py``) and ``benchmarks/reproduce.py``:

* :func:`limit_threads` (call before importing torch / jax: ``--threads``
  intra-op threads, the libraries' choice by default; see :data:`DEFAULT_THREADS`),
* a tiny backend layer (:func:`get_backend`) so that one model / guide
  definition runs under Pyro and NumPyro: ``bk.sample``, ``bk.param``,
  ``bk.plate(x, idx, num_data)``, ``bk.dist``, ``bk.ops`` (activations,
  stop-gradient),
* numpy parameter initialisation (:func:`linear_init`: ``nn.Linear``'s
  uniform(+-1/sqrt(fan_in))), identical for both backends,
* the estimator registry (:func:`make_elbo`: ``--estimator`` name -> class of
  the chosen backend, with a clear error when the backend lacks it),
* trainers (:class:`PyroTrainer`, :class:`NumPyroTrainer`: one optimizer step
  per call, optional second optimizer for a parameter group),
* the test bound (:func:`make_bound`: the K-sample importance-weighted bound per
  example, chunked over data and samples; ``iwae_bound`` of the backend's
  package when it has one),
* the training loop with tqdm (:func:`train`), the plot (:func:`save_plot`) and
  the final JSON line (:func:`finish`).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import checkpoint  # noqa: E402  (examples/checkpoint.py)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# An installed package wins; otherwise use the checkout this file is in.
sys.path.append(str(ROOT))


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
# backends: one model definition for Pyro and NumPyro


class _TorchOps:
    def __init__(self):
        import torch
        import torch.nn.functional as F

        self.tanh = torch.tanh
        self.relu = torch.relu
        self.leaky_relu = lambda x: F.leaky_relu(x, 0.3)
        self.sg = lambda x: x.detach()
        self.zeros = lambda shape: torch.zeros(shape)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)


class _JaxOps:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.tanh = jnp.tanh
        self.relu = jax.nn.relu
        self.leaky_relu = lambda x: jax.nn.leaky_relu(x, 0.3)
        self.sg = jax.lax.stop_gradient
        self.zeros = lambda shape: jnp.zeros(shape)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)


class PyroBackend:
    name = "pyro"

    def __init__(self, init_params):
        import torch
        import pyro
        import pyro.distributions as dist

        self.pyro, self.dist, self.torch = pyro, dist, torch
        self.ops = _TorchOps()
        pyro.clear_param_store()
        for k, v in init_params.items():
            pyro.param(k, torch.as_tensor(np.asarray(v, np.float32)).clone())
        self.names = list(init_params)

    def params(self):
        return {k: self.pyro.param(k) for k in self.names}

    def sample(self, name, fn, obs=None):
        return self.pyro.sample(name, fn, obs=obs)

    def plate(self, idx, num_data):
        return self.pyro.plate("data", num_data, subsample=idx)

    def asarray(self, x):
        return self.torch.as_tensor(x)

    def one_hot_categorical(self, logits):
        from pyro_binary_grads import OneHotCategorical

        return OneHotCategorical(logits=logits)


class NumPyroBackend:
    name = "numpyro"

    def __init__(self, init_params):
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro import handlers

        self.numpyro, self.dist, self.handlers, self.jnp = numpyro, dist, handlers, jnp
        self.ops = _JaxOps()
        self.init = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in init_params.items()}

    def params(self):
        return {k: self.numpyro.param(k, v) for k, v in self.init.items()}

    def sample(self, name, fn, obs=None):
        return self.numpyro.sample(name, fn, obs=obs)

    def plate(self, idx, num_data):
        # a plate of the batch size, scaled to the data set (NumPyro's
        # subsample_size would draw a permutation of num_data rows every step)
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(self.handlers.scale(scale=num_data / idx.shape[0]))
        stack.enter_context(self.numpyro.plate("data", idx.shape[0], dim=-1))
        return stack

    def asarray(self, x):
        return self.jnp.asarray(x)

    def one_hot_categorical(self, logits):
        from numpyro_binary_grads import OneHotCategorical

        return OneHotCategorical(logits=logits)


def get_backend(name, init_params):
    if name == "pyro":
        return PyroBackend(init_params)
    if name == "numpyro":
        return NumPyroBackend(init_params)
    raise SystemExit(f"--backend must be pyro or numpyro, got {name!r}")


# ---------------------------------------------------------------------------
# parameters (numpy, shared by both backends)


def linear_init(rng, fan_in, fan_out, name, params, bias=None):
    """``nn.Linear``'s init, weight stored (fan_in, fan_out): ``params[name+'_W'/'_b']``."""
    lim = 1.0 / math.sqrt(fan_in)
    params[name + "_W"] = rng.uniform(-lim, lim, (fan_in, fan_out)).astype(np.float32)
    params[name + "_b"] = (
        rng.uniform(-lim, lim, fan_out).astype(np.float32) if bias is None
        else np.asarray(bias, np.float32)
    )


def mlp_init(rng, sizes, name, params, out_bias=None):
    """Layers ``name0, name1, ...`` of an MLP with ``sizes`` (in, h1, ..., out)."""
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        linear_init(rng, sizes[i], sizes[i + 1], f"{name}{i}", params,
                    out_bias if last else None)


def mlp(P, name, x, n_layers, act):
    """Apply an MLP initialised by :func:`mlp_init` (``act`` between layers)."""
    for i in range(n_layers):
        x = x @ P[f"{name}{i}_W"] + P[f"{name}{i}_b"]
        if i < n_layers - 1:
            x = act(x)
    return x


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
# arguments, training loop, plot, result


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


def check_outputs(args, name, suffixes=(".json", ".png")):
    """Refuse to start (``SystemExit``) when ``<out>/<name>`` outputs of an earlier
    run exist and ``--overwrite`` was not given."""
    if getattr(args, "overwrite", False):
        return
    found = [args.out / f"{name}{s}" for s in suffixes if (args.out / f"{name}{s}").exists()]
    if found:
        raise SystemExit(
            f"{found[0]} exists (an earlier run with these settings). Pass --overwrite to "
            "replace it, or --tag SUFFIX / --out DIR to keep both."
        )


def print_summary(result):
    """One readable line: train objective (last tenth), test bound(s), ms/step, plot."""
    parts = [f"{result.get('example', 'run')} [{result.get('backend')}"
             + (f", {result['estimator']}" if "estimator" in result else "") + "]",
             f"{result.get('steps')} steps"]
    train = result.get("train_objective_last10pct")
    if train is not None:
        parts.append(f"train objective {train:.2f} (mean of the last tenth)")
    for k, v in result.items():
        if k.startswith("test_bound_") and not k.endswith("_subset") and v is not None:
            size = result.get("test_size")
            parts.append(f"test {k[len('test_bound_'):]}-sample bound {v:.2f}"
                         + (f" ({size} examples)" if size else ""))
    if result.get("ms_per_step") is not None:
        parts.append(f"{result['ms_per_step']:.1f} ms/step")
    if result.get("plot"):
        parts.append(f"plot {result['plot']}")
    print(" | ".join(parts), flush=True)


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


def train(args, trainer, batches, step_args, evaluate, desc):
    """
    The training loop: ``loss = trainer.step(*step_args(batch))`` for each
    batch; ``evaluate(step)`` (a float) at step 0, every ``args.eval_every``
    steps and at the end. Returns ``history`` [(step, -loss)], ``tests``
    [(step, value)], training seconds (excluding evaluations; includes the
    first steps' compilation under jit, reported apart as ``first_step_s``).
    """
    from tqdm import tqdm

    if getattr(args, "eval_every", None) is None:
        args.eval_every = max(1, min(10_000, (args.num_steps or 10_000) // 10))
    ckpt = checkpoint.Resumable(
        getattr(args, "checkpoint", None) or Path(args.out) / f"{desc.replace('/', '_')}.ckpt",
        getattr(args, "checkpoint_every", 0), getattr(args, "resume", False))
    loop, batches = ckpt.start(trainer, batches, checkpoint.settings_of(args))
    if loop is None:
        loop = {"step": 0, "history": [], "tests": [(0, evaluate(0))], "train_time": 0.0,
                "first": None, "running": None, "resumed_at": []}
    else:
        loop["resumed_at"].append(loop["step"])
    history, tests, start = loop["history"], loop["tests"], loop["step"]
    train_time, first, running = loop["train_time"], loop["first"], loop["running"]
    args.resumed_at = loop["resumed_at"]
    bar = tqdm(batches, total=args.num_steps, initial=start, disable=args.no_progress,
               file=sys.stderr, desc=desc, mininterval=2.0)
    for step, batch in enumerate(bar, start + 1):
        t = time.perf_counter()
        loss = trainer.step(*step_args(batch))
        dt = time.perf_counter() - t
        if first is None:
            first = dt
        else:
            train_time += dt
        value = -loss / args.num_data
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step}: {loss}")
        history.append((step, value))
        running = value if running is None else 0.99 * running + 0.01 * value
        if step % args.eval_every == 0 or step == args.num_steps:
            tests.append((step, evaluate(step)))
        if step % 50 == 0 or step == args.num_steps:
            bar.set_postfix(train=f"{running:.2f}", test=f"{tests[-1][1]:.2f}")
        ckpt.maybe_save(step, args.num_steps, trainer, {
            "step": step, "history": history, "tests": tests, "train_time": train_time,
            "first": first, "running": running, "resumed_at": args.resumed_at})
    bar.close()
    ckpt.finish()
    return history, tests, train_time, first or 0.0


def save_plot(path, history, tests, title, test_label, ylabel="nats per example", final=None):
    """
    The training curve (per step and smoothed), the periodic test bound
    (``tests``, every point inside the axes, the first included) and, with
    ``final = (value, n)``, the final test bound on ``n`` examples (the full
    test set by default) as a star at the last step. Returns the y limits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h[0] for h in history])
    values = np.array([h[1] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, values, color="0.8", lw=0.5, label="train objective (minibatch)")
    w = min(200, len(values) // 5)
    if w > 1:
        smooth = np.convolve(values, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="C0", label=f"train objective ({w}-step mean)")
    points = [t[1] for t in tests]
    if tests:
        ts = np.array(tests)
        ax.plot(ts[:, 0], ts[:, 1], "o-", color="C1", label=test_label)
    if final is not None:
        value, n = final
        ax.plot([steps[-1] if len(steps) else 0], [value], "*", color="C3", ms=12,
                label=f"final test bound, {n} examples: {value:.2f}")
        points.append(value)
    # the y range: the curve without its first tenth (the initial transient) and
    # every test point
    tail = values[len(values) // 10 :] if len(values) > 20 else values
    lo = min([np.percentile(tail, 1)] + points) if len(tail) else min(points)
    hi = max([values.max()] + points) if len(values) else max(points)
    pad = 0.05 * (hi - lo) + 1
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ax.get_ylim()


def drift_summary(history, parts=10):
    """
    The training objective averaged over each tenth of the run: the best tenth,
    the last tenth, and ``drift`` = best - last (nats; > 2 marks a run that got
    worse while it trained, as a collapsing estimator does). ``None`` values for
    runs shorter than ``parts`` steps.
    """
    values = np.array([h[1] for h in history], dtype=float)
    if len(values) < parts:
        return {"train_objective_best_tenth": None, "train_objective_last_tenth": None,
                "train_objective_drift": None}
    means = [float(c.mean()) for c in np.array_split(values, parts)]
    best, last = max(means), means[-1]
    return {"train_objective_best_tenth": best, "best_tenth_index": int(np.argmax(means)),
            "train_objective_last_tenth": last, "train_objective_drift": best - last}


def finish(args, name, result, history, tests):
    """
    Write ``<out>/<name>.json`` (with the curves) and print the JSON line; the
    line gets :func:`drift_summary`'s fields.
    """
    result = {**result, **drift_summary(history)}
    if getattr(args, "resumed_at", None):
        result["resumed_at"] = list(args.resumed_at)  # steps of the checkpoints resumed from
    with open(args.out / f"{name}.json", "w") as fh:
        json.dump({**result, "history": history, "tests": tests}, fh)
    print(json.dumps(result), flush=True)
    return result


def mean_last(history, frac=0.1, at_least=100):
    n = max(1, min(len(history), max(at_least, int(len(history) * frac))))
    return float(np.mean([h[1] for h in history[-n:]]))


def eval_subset(n_total, n, seed):
    """Sorted seeded random subset of ``n`` row indices (all rows if n >= n_total)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))
