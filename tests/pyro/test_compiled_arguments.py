"""
The compiled classes' arguments: what makes a new trace (the program, the
number and shapes of the tensor arguments, the values of the others), tensors
inside tuples, lists and dicts as trace inputs, the bounded cache, and the
eager step's errors after a replay. Each replayed step is compared with the
eager class's step on the same arguments and the same fixed noise.
"""

import collections

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_binary_grads import (
    VIMCO,
    DisARM_ELBO,
    JitDisARM_ELBO,
    JitLocalDisARM_IWAE,
    JitREBAR_ELBO,
    JitVIMCO,
    LocalDisARM_IWAE,
    REBAR_ELBO,
)

PAIRS = {
    "DisARM": (DisARM_ELBO, JitDisARM_ELBO, {}),
    "VIMCO": (VIMCO, JitVIMCO, {"num_samples": 3}),
    "LocalDisARM": (LocalDisARM_IWAE, JitLocalDisARM_IWAE, {"num_pairs": 2}),
    "REBAR": (REBAR_ELBO, JitREBAR_ELBO, {"adapt": False}),
}

W = torch.tensor([1.5, -0.5])


def global_model(x, y=None):
    b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal((b * W).sum(-1, keepdim=True), 1.0).to_event(1), obs=x)
        if y is not None:
            pyro.sample("y", dist.Normal(b.sum(-1), 1.0), obs=y)


def global_guide(x, y=None):
    c = pyro.param("c", torch.tensor([0.5, -0.7]))
    pyro.sample("b", dist.Bernoulli(logits=c).to_event(1))


def grads(elbo, model, guide, *args, **kwargs):
    store = pyro.get_param_store()
    for name in store.keys():
        store[name].unconstrained().grad = None
    loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
    return loss, {n: store[n].unconstrained().grad.clone() for n in store.keys()}


def compare(pair, model, guide, calls, noise):
    """Runs ``calls`` (``(args, kwargs)`` pairs) through the eager and the compiled
    class with the fixed noise ``noise(args)`` and asserts equal losses and
    gradients at every step."""
    eager_cls, jit_cls, kw = PAIRS[pair]
    pyro.clear_param_store()
    eager, jit = eager_cls(**kw), jit_cls(**kw)
    for i, (args, kwargs) in enumerate(calls):
        eager._noise = jit._noise = noise(args)
        loss_e, g_e = grads(eager, model, guide, *args, **kwargs)
        loss_j, g_j = grads(jit, model, guide, *args, **kwargs)
        assert abs(loss_e - loss_j) < 1e-5 * (1 + abs(loss_e)), (i, loss_e, loss_j)
        for name in g_e:
            torch.testing.assert_close(g_j[name], g_e[name], rtol=1e-5, atol=1e-7,
                                       msg=f"step {i}, {name}")
    return jit


def _global_noise(num_draws):
    def noise(args):
        return {"b": torch.tensor([[0.3, 0.8], [0.6, 0.1], [0.9, 0.45]][:num_draws])
                .reshape((num_draws, 1, 2) if num_draws > 1 else (2,))}
    return noise


NUM_DRAWS = {"DisARM": 1, "REBAR": 1, "VIMCO": 3, "LocalDisARM": 2}

X4 = torch.tensor([[1.0], [2.0], [0.5], [-1.0]])
X1 = X4[:1]
Y4 = torch.tensor([1.0, 0.0, 2.0, 1.0])


@pytest.mark.parametrize("pair", ["DisARM", "VIMCO", "LocalDisARM", "REBAR"])
def test_a_batch_of_one_at_tracing_does_not_change_later_batches(pair):
    """A global site's signal sums the data plate; the sum was once skipped for a
    plate of size 1 by a Python test, which a trace freezes: traced on a batch of
    one, every later batch left the plate unsummed (DisARM's gradient 1.10
    against the exact 0.74). Each shape has its own trace now."""
    calls = [((X4,), {}), ((X1,), {}), ((X4,), {}), ((X4,), {}), ((X1,), {}), ((X4,), {})]
    jit = compare(pair, global_model, global_guide, calls, _global_noise(NUM_DRAWS[pair]))
    assert len(jit._compiled) == 2 and all(t.compiled is not None for t in jit._compiled.values())


@pytest.mark.parametrize("pair", ["DisARM", "VIMCO"])
def test_the_number_of_arguments_is_part_of_the_trace(pair):
    """``step(x)`` and ``step(x, y)`` (the SS-VAE pattern) are two traces: the
    second once replayed the first's, which ignores ``y``."""
    calls = [((X4,), {}), ((X4, Y4), {}), ((X4,), {}), ((X4, Y4), {}), ((X4, Y4), {}),
             ((X4,), {})]
    jit = compare(pair, global_model, global_guide, calls, _global_noise(NUM_DRAWS[pair]))
    assert len(jit._compiled) == 2


@pytest.mark.parametrize("pair", ["DisARM", "VIMCO"])
@pytest.mark.parametrize("container", ["tuple", "list", "dict", "OrderedDict", "defaultdict",
                                       "namedtuple", "kwarg"])
def test_tensors_in_containers_are_inputs_of_the_trace(pair, container):
    """A tensor inside a tuple, list, dict (ordered, default) or named tuple, or
    passed by keyword, is an input of the trace: new tensors at every step (a
    data loader's batches) replay one trace, step for step as the eager class.
    (Such arguments were once constants keyed by identity: every step a new
    key, an eager step and a cache entry that was never freed.)"""
    Batch = collections.namedtuple("Batch", ["x", "y"])

    def wrap(x, y):
        if container == "OrderedDict":
            return collections.OrderedDict(x=x, y=y)
        if container == "defaultdict":
            return collections.defaultdict(list, x=x, y=y)
        return {"tuple": (x, y), "list": [x, y], "dict": {"x": x, "y": y},
                "namedtuple": Batch(x, y)}.get(container)

    def unwrap(batch):
        return (batch["x"], batch["y"]) if "dict" in container.lower() else (batch[0], batch[1])

    def model(batch=None, x=None, y=None):
        return global_model(*(unwrap(batch) if batch is not None else (x, y)))

    def guide(batch=None, x=None, y=None):
        return global_guide(*(unwrap(batch) if batch is not None else (x, y)))

    eager_cls, jit_cls, kw = PAIRS[pair]
    pyro.clear_param_store()
    eager, jit = eager_cls(**kw), jit_cls(**kw)
    eager._noise = jit._noise = _global_noise(NUM_DRAWS[pair])(None)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        buf_x = torch.randn(X4.shape, generator=gen) + 2.0  # a new batch
        buf_y = torch.randn(Y4.shape, generator=gen)
        args, kwargs = ((), {"x": buf_x, "y": buf_y}) if container == "kwarg" else \
            ((wrap(buf_x, buf_y),), {})
        loss_e, g_e = grads(eager, model, guide, *args, **kwargs)
        loss_j, g_j = grads(jit, model, guide, *args, **kwargs)
        assert abs(loss_e - loss_j) < 1e-5 * (1 + abs(loss_e)), i
        torch.testing.assert_close(g_j["c"], g_e["c"], rtol=1e-5, atol=1e-7, msg=f"step {i}")
    assert len(jit._compiled) == 1 and next(iter(jit._compiled.values())).compiled is not None


def test_fresh_containers_and_bound_methods_reuse_one_trace():
    """A fresh tuple of tensors at every step, and ``vae.model`` / ``vae.guide``
    bound anew at every call, replay one trace (they once made a new entry, an
    eager step, every step)."""

    class VAE:
        def model(self, batch):
            return global_model(*batch)

        def guide(self, batch):
            return global_guide(*batch)

    vae = VAE()
    pyro.clear_param_store()
    elbo = JitDisARM_ELBO()
    for _ in range(6):
        elbo.loss_and_grads(vae.model, vae.guide, (X4.clone(), Y4.clone()))
    assert len(elbo._compiled) == 1 and next(iter(elbo._compiled.values())).compiled is not None


def test_vimco_subsample_scale_follows_the_minibatch():
    """VIMCO's bound scales the per-element terms by N / n of the subsampled
    plate; a trace made on the full index set (scale 1) once kept that scale for
    every minibatch. Each minibatch size has its own trace now."""
    N = 6
    X = torch.linspace(-1.0, 2.0, N * 2).reshape(N, 2)

    def model(idx):
        with pyro.plate("data", N, subsample=idx):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(2)).to_event(1))
            pyro.sample("x", dist.Normal(2 * b, 1.0).to_event(1), obs=X[idx])

    def guide(idx):
        c = pyro.param("c", torch.tensor([0.5, -0.7]))
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("b", dist.Bernoulli(logits=X[idx] * 0 + c).to_event(1))

    def noise(args):
        n = args[0].shape[0]
        u = torch.linspace(0.05, 0.95, 3 * n * 2).reshape(3, n, 2)
        return {"b": u}

    full, part = torch.arange(N), torch.tensor([1, 4])
    calls = [((part,), {}), ((full,), {}), ((part,), {}), ((full,), {}), ((part,), {}),
             ((torch.tensor([0, 5]),), {})]
    compare("VIMCO", model, guide, calls, noise)


def test_an_unhashable_argument_runs_eagerly_with_one_warning():
    """A numpy array (neither a tensor nor hashable) cannot be checked for
    changes between steps: the step runs eagerly, with one warning."""
    pyro.clear_param_store()
    x = X4.numpy().copy()

    def model(x):
        return global_model(torch.as_tensor(x))

    def guide(x):
        return global_guide(torch.as_tensor(x))

    eager, jit = DisARM_ELBO(), JitDisARM_ELBO()
    eager._noise = jit._noise = _global_noise(1)(None)
    with pytest.warns(UserWarning, match="runs this step eagerly") as record:
        for i in range(4):
            x[:] = np.arange(4)[:, None] * (i + 1.0)
            loss_e, g_e = grads(eager, model, guide, x)
            loss_j, g_j = grads(jit, model, guide, x)
            assert abs(loss_e - loss_j) < 1e-6 * (1 + abs(loss_e))
            torch.testing.assert_close(g_j["c"], g_e["c"])
    assert sum("runs this step eagerly" in str(w.message) for w in record) == 1
    assert len(jit._compiled) == 0


def test_traces_are_bounded_with_one_warning(monkeypatch):
    """A program whose shapes change at every step keeps at most ``max_traces``
    traces and warns once that each new one costs an eager step and a trace."""
    monkeypatch.setattr(JitDisARM_ELBO, "max_traces", 3)
    pyro.clear_param_store()
    elbo = JitDisARM_ELBO()
    with pytest.warns(UserWarning, match="drops the least recently used") as record:
        for n in range(1, 8):
            elbo.loss_and_grads(global_model, global_guide, torch.ones(n, 1))
    assert sum("least recently used" in str(w.message) for w in record) == 1
    assert len(elbo._compiled) == 3


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
def test_nan_logits_after_tracing_raise_naming_the_site(validate):
    """As the eager class: NaN logits at a guide site raise an error naming it,
    also from a replayed step (which once only warned of a NaN loss)."""
    pyro.clear_param_store()
    elbo = JitDisARM_ELBO()
    with pyro.validation_enabled(validate):
        for _ in range(3):
            elbo.loss_and_grads(global_model, global_guide, X4)
        with torch.no_grad():
            pyro.param("c").unconstrained().fill_(float("nan"))
        with pytest.raises(ValueError, match="Guide site 'b' has NaN or infinite logits"):
            elbo.loss_and_grads(global_model, global_guide, X4)
