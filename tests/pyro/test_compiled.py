"""
The compiled classes (``pyro_binary_grads.compiled``): exact gradients from the
replayed trace (5 SE with power, as ``test_unbiased.py``), fresh noise at every
step, ``pyro.module`` weights, and the error for programs they cannot compile.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

import pyro
import pyro.distributions as dist

import specs
import stats
from pyro_oracle import init_params
from test_unbiased import check, exact_flat
from pyro_binary_grads.compiled import JitREBAR_ELBO, ModuleNameReused
from pyro_binary_grads import (
    ARM_ELBO,
    REBAR_ELBO,
    RLOO_ELBO,
    VIMCO,
    DisARM_ELBO,
    JitARM_ELBO,
    JitDisARM_ELBO,
    JitLocalDisARM_IWAE,
    JitRLOO_ELBO,
    JitVIMCO,
    LocalDisARM_IWAE,
)


def compiled_draws(elbo, spec, names, calls, num_batches=30):
    """Batch means of the gradients ``loss_and_grads`` leaves in ``.grad``, from
    the third step on (the first runs eagerly, the second traces)."""
    model, guide, args = spec.bind(specs.pyro_backend())
    store = pyro.get_param_store()
    rows = []
    for i in range(calls + 2):
        params = [store[k].unconstrained() for k in names]
        for p in params:
            p.grad = None
        elbo.loss_and_grads(model, guide, *args)
        if i >= 2:
            rows.append(np.concatenate([
                np.zeros(p.numel()) if p.grad is None else p.grad.double().flatten().numpy()
                for p in params]))
    return stats.batch_means(np.stack(rows), num_batches)


CASES = [
    # (class, spec, particles per call, calls, validation)
    (JitDisARM_ELBO, "sbn", 2000, 30, True),
    (JitDisARM_ELBO, "sbn", 2000, 30, False),
    (JitDisARM_ELBO, "two_layer", 2000, 30, True),
    (JitDisARM_ELBO, "subsample", 50, 3600, True),
    (JitARM_ELBO, "sbn", 2000, 30, True),
    (JitARM_ELBO, "sbn", 2000, 30, False),
    (JitRLOO_ELBO, "sbn", 2000, 30, True),
    (JitRLOO_ELBO, "sbn", 2000, 30, False),
]


@pytest.mark.parametrize(
    "cls,spec_name,particles,calls,validate", CASES,
    ids=[f"{c.__name__}-{s}-{'validation on' if v else 'validation off'}"
         for c, s, _, _, v in CASES])
def test_compiled_unbiased(cls, spec_name, particles, calls, validate):
    spec = specs.SPECS[spec_name]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = cls(num_particles=particles, vectorize_particles=True)
    with pyro.validation_enabled(validate):
        draws = compiled_draws(elbo, spec, names, calls)
    assert len(elbo._compiled) == 1  # the steps after the first replayed a trace
    check(draws, exact, f"{cls.__name__} {spec_name}")


REBAR_CASES = [("sbn", False, True), ("sbn", True, True), ("sbn", True, False),
               ("two_layer", True, True)]


@pytest.mark.parametrize(
    "spec_name,adapt,validate", REBAR_CASES,
    ids=[f"{s}-adapt={a}-{'validation on' if v else 'validation off'}" for s, a, v in REBAR_CASES])
def test_compiled_rebar_unbiased(spec_name, adapt, validate):
    """The model and guide gradients of the replayed REBAR step are the ELBO's
    (with ``adapt=True`` the variance term, added after the replay, moves only
    the temperature and eta)."""
    spec = specs.SPECS[spec_name]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = JitREBAR_ELBO(num_particles=2000, vectorize_particles=True, adapt=adapt)
    with pyro.validation_enabled(validate):
        draws = compiled_draws(elbo, spec, names, 30)
    assert len(elbo._compiled) == 1
    check(draws, exact, f"JitREBAR_ELBO(adapt={adapt}) {spec_name}")


EAGER_VS_JIT = [
    # (eager class, compiled class, spec, constructor kwargs)
    (DisARM_ELBO, JitDisARM_ELBO, "sbn", {}),
    (DisARM_ELBO, JitDisARM_ELBO, "two_layer", {}),
    (ARM_ELBO, JitARM_ELBO, "sbn", {}),
    (RLOO_ELBO, JitRLOO_ELBO, "two_layer", {"num_samples": 3}),
    (VIMCO, JitVIMCO, "sbn", {"num_samples": 3}),
    (LocalDisARM_IWAE, JitLocalDisARM_IWAE, "sbn", {"num_pairs": 2}),
    (REBAR_ELBO, JitREBAR_ELBO, "sbn", {"adapt": False}),
    (REBAR_ELBO, JitREBAR_ELBO, "two_layer", {}),  # adapted: variance term after the replay
]


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
@pytest.mark.parametrize(
    "eager_cls,jit_cls,spec_name,kw", EAGER_VS_JIT,
    ids=[f"{j.__name__}-{s}-{k}" for _, j, s, k in EAGER_VS_JIT])
def test_replayed_step_equals_the_eager_step(eager_cls, jit_cls, spec_name, kw, validate):
    """
    With the same (fixed) noise, the replayed step returns the eager class's
    loss and leaves in every parameter (the adapted temperature and eta
    included) the eager class's gradient, draw for draw, not only in
    expectation: a trace that dropped the eager step's ``torch.no_grad()``
    regions (an extra zero-mean score term; REBAR's conditional noise
    differentiated) fails here though its mean gradient may be exact.
    """
    spec = specs.SPECS[spec_name]()
    init_params(spec)
    model, guide, args = spec.bind(specs.pyro_backend())
    eager = eager_cls(num_particles=4, vectorize_particles=True, **kw)
    jit = jit_cls(num_particles=4, vectorize_particles=True, **kw)
    store = pyro.get_param_store()

    def grads(elbo):
        for p in store.values():
            p.unconstrained().grad = None
        loss = elbo.loss_and_grads(model, guide, *args)
        return loss, {k: store[k].unconstrained().grad for k in store.keys()}

    with pyro.validation_enabled(validate):
        grads(eager)  # creates REBAR's temperature and eta
        eager.differentiable_loss(model, guide, *args)
        eager._noise = jit._noise = dict(eager._last_evals.noise)  # one draw, used as given
        loss_e, g_e = grads(eager)
        for _ in range(3):  # eager, tracing, replay
            loss_j, g_j = grads(jit)
    assert len(jit._compiled) == 1
    assert abs(loss_e - loss_j) < 1e-9 * (1 + abs(loss_e))
    for k in g_e:
        assert g_e[k] is not None and g_e[k].abs().max() > 0, k  # every parameter has a gradient
        torch.testing.assert_close(g_j[k], g_e[k], rtol=1e-7, atol=1e-10, msg=k)


def test_compiled_draws_fresh_noise_every_step():
    spec = specs.SPECS["sbn"]()
    init_params(spec)
    model, guide, args = spec.bind(specs.pyro_backend())
    elbo = JitDisARM_ELBO()
    losses = []
    for _ in range(6):  # parameters are not updated: only the noise changes
        losses.append(elbo.loss_and_grads(model, guide, *args))
    assert len(set(losses[2:])) == 4, losses  # traced steps: four different draws


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def test_pyro_module_weights_train():
    pyro.clear_param_store()
    enc = Encoder()
    dec = nn.Linear(3, 4)
    x = (torch.rand(20, 4, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.get_default_dtype())

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(b)).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=enc(x)).to_event(1))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), JitDisARM_ELBO())
    w0 = enc.lin.weight.detach().clone()
    losses = [svi.step(x) for _ in range(200)]
    assert np.isfinite(losses).all()
    assert not torch.equal(w0, enc.lin.weight.detach())  # the encoder got gradients
    assert np.mean(losses[-20:]) < np.mean(losses[:20])


def test_non_broadcasting_program_names_the_eager_class():
    def model():
        b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(4)).to_event(1))
        pyro.sample("x", dist.Normal(b.sum(), 1.0), obs=torch.tensor(1.0))  # sums every dim

    def guide():
        q = pyro.param("q", torch.zeros(4))
        pyro.sample("b", dist.Bernoulli(logits=q).to_event(1))

    pyro.clear_param_store()
    elbo = JitDisARM_ELBO()
    with pytest.warns(UserWarning, match="does not broadcast"):
        with pytest.raises(NotImplementedError, match="Use DisARM_ELBO"):
            elbo.loss_and_grads(model, guide)
    assert DisARM_ELBO  # the class the message names exists


def _module_program(enc, dec, update=False):
    def model(x):
        pyro.module("dec", dec, update_module_params=update)
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(b)).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc, update_module_params=update)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=enc(x)).to_event(1))

    return model, guide


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
def test_pyro_module_name_reused_by_a_new_module_raises(validate):
    pyro.clear_param_store()
    x = (torch.rand(20, 4, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.get_default_dtype())
    with pyro.validation_enabled(validate):
        svi = pyro.infer.SVI(*_module_program(Encoder(), nn.Linear(3, 4)),
                             pyro.optim.Adam({"lr": 0.05}), JitDisARM_ELBO())
        for _ in range(3):
            svi.step(x)
        # new modules under the names used above, param store not cleared
        enc, dec = Encoder(), nn.Linear(3, 4)
        elbo = JitDisARM_ELBO()
        svi = pyro.infer.SVI(*_module_program(enc, dec), pyro.optim.Adam({"lr": 0.05}), elbo)
        with pytest.raises(ModuleNameReused, match=r"pyro.module\('(enc|dec)'.*clear_param_store"):
            svi.step(x)
        # the fix the message names: load the stored parameters into the new modules
        svi = pyro.infer.SVI(*_module_program(enc, dec, update=True),
                             pyro.optim.Adam({"lr": 0.05}), JitDisARM_ELBO())
        losses = [svi.step(x) for _ in range(3)]
    assert np.isfinite(losses).all()
    store = pyro.get_param_store()
    assert enc.lin.weight is store["enc$$$lin.weight"]  # the module now computes with the store's


def test_param_created_after_the_first_step_names_it():
    pyro.clear_param_store()
    late = [False]

    def model():
        b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(4)).to_event(1))
        pyro.sample("x", dist.Normal(b.sum(-1), 1.0), obs=torch.tensor(1.0))

    def guide():
        q = pyro.param("q", torch.zeros(4))
        if late[0]:  # a parameter the first (eager) step did not create
            q = q + pyro.param("late", torch.zeros(4))
        pyro.sample("b", dist.Bernoulli(logits=q).to_event(1))

    elbo = JitDisARM_ELBO()
    elbo.loss_and_grads(model, guide)
    late[0] = True
    with pytest.raises(NotImplementedError, match="'late' after its first step.*Use DisARM_ELBO"):
        elbo.loss_and_grads(model, guide)  # traces


# -- pyro_binary_grads.optim: one torch optimizer for SVI ---------------------


def _optim_program(phase):
    """Model and guide with a ``pyro.module`` encoder, a ``pyro.param`` that a
    step may read without using (``phase[0] == 1``: its gradient is None at
    that step) and one created at step 3 (``phase[0] >= 2``)."""
    enc = Encoder()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("x", dist.Normal(b.sum(-1, keepdim=True), 1.0).to_event(1), obs=x[..., :1])

    def guide(x):
        pyro.module("enc", enc)
        s = pyro.param("s", torch.full((3,), 0.5), constraint=dist.constraints.positive)
        logits = enc(x) * (1.0 if phase[0] == 1 else s)  # phase 1: s read, unused
        if phase[0] >= 2:
            logits = logits + pyro.param("late", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1))

    return model, guide, enc


def _trajectory(make_optim, steps=8, state=None, elbo=DisARM_ELBO):
    """Parameters after ``steps`` SVI steps from a fixed start and seed; the
    optimizer's state at the end (``state``: loaded before the first step)."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    model, guide, _ = _optim_program(phase := [0])
    x = torch.randn(10, 4)
    optim = make_optim()
    if state is not None:
        optim.set_state(state)
    svi = pyro.infer.SVI(model, guide, optim, elbo())
    pyro.set_rng_seed(0)
    for i in range(steps):
        phase[0] = {2: 1, 3: 1}.get(i, 0 if i < 2 else 2)  # s unused at steps 2-3, late from 4
        svi.step(x)
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys()}, optim


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("args,clip", [
    ({"lr": 0.05}, None),
    ({"lr": 0.05, "betas": (0.8, 0.9), "weight_decay": 0.01}, {"clip_norm": 0.5}),
    (lambda name: {"lr": 0.1 if "late" in name else 0.03}, None),
], ids=["dict", "dict+clip", "per-parameter"])
def test_shared_adam_follows_pyro_adam(args, clip):
    """Step for step the update of pyro.optim.Adam (one torch Adam per
    parameter): parameters created at a later step join, a parameter read
    without a gradient moves on its moments (zero gradient) as with Pyro."""
    from pyro_binary_grads.optim import Adam

    ref, _ = _trajectory(lambda: pyro.optim.Adam(args, clip))
    ours, optim = _trajectory(lambda: Adam(args, clip))
    _assert_same(ours, ref)
    assert len({id(o) for o in optim.optim_objs.values()}) == 1  # one torch optimizer
    assert len(optim.optim_objs) == 4  # enc.lin.weight, enc.lin.bias, s, late (from step 5)
    assert all(p.grad is None for p in optim.optim_objs)  # zero_grads had nothing to do


@pytest.mark.parametrize("elbo_cls", [JitDisARM_ELBO, JitREBAR_ELBO, REBAR_ELBO])
def test_shared_adam_with_compiled_and_rebar_elbos(elbo_cls):
    """The same trajectory as pyro.optim.Adam with a compiled ELBO, and with
    REBAR's own parameters (temperature, eta: created inside loss_and_grads,
    trained on the variance gradient)."""
    from pyro_binary_grads.optim import Adam

    def traj(make_optim):
        pyro.clear_param_store()
        torch.manual_seed(1)
        model, guide, _ = _optim_program([0])
        x = torch.randn(10, 4)
        elbo = elbo_cls()
        svi = pyro.infer.SVI(model, guide, make_optim(), elbo)
        pyro.set_rng_seed(0)
        losses = [svi.step(x) for _ in range(6)]
        if elbo_cls is not REBAR_ELBO:
            assert len(elbo._compiled) == 1 and next(iter(elbo._compiled.values())).compiled
        store = pyro.get_param_store()
        return losses, {k: store[k].detach().clone() for k in store.keys()}

    ref_losses, ref = traj(lambda: pyro.optim.Adam({"lr": 0.05}))
    losses, ours = traj(lambda: Adam({"lr": 0.05}))
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    _assert_same(ours, ref)
    assert len(ref) == 3 if elbo_cls is JitDisARM_ELBO else len(ref) > 3, list(ref)  # REBAR's own


def _split_run(save_with, load_with, tmp_path, load_state=True):
    """Four SVI steps, the parameters and the optimizer saved (``save_with``),
    both loaded in a fresh start (``load_with``), four more steps. Returns the
    parameters at the end."""
    from pyro_binary_grads.optim import Adam

    make = {"pyro": lambda: pyro.optim.Adam({"lr": 0.05}), "ours": lambda: Adam({"lr": 0.05})}
    torch.manual_seed(1)
    x, w0 = torch.randn(10, 4), torch.randn(4, 3)
    phase = [0]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("x", dist.Normal(b.sum(-1, keepdim=True), 1.0).to_event(1), obs=x[..., :1])

    def guide(x):
        logits = x @ pyro.param("w", w0) * pyro.param("s", torch.ones(3),
                                                       constraint=dist.constraints.positive)
        if phase[0]:
            logits = logits + pyro.param("late", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    optim = make[save_with]()
    svi = pyro.infer.SVI(model, guide, optim, DisARM_ELBO())
    for i in range(4):
        phase[0] = i >= 2
        svi.step(x)
    optim.save(tmp_path / "optim.pt")
    params = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(params)
    optim = make[load_with]()
    if load_state:
        optim.load(tmp_path / "optim.pt")
    svi = pyro.infer.SVI(model, guide, optim, DisARM_ELBO())
    for _ in range(4):
        svi.step(x)
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys()}


@pytest.mark.parametrize("save_with,load_with", [("pyro", "ours"), ("ours", "pyro"), ("ours", "ours")])
def test_shared_adam_state_round_trip(save_with, load_with, tmp_path):
    """get_state / save is Pyro's format (one state dict per parameter name):
    either optimizer saves, either loads, and the run goes on as Pyro's own."""
    ref = _split_run("pyro", "pyro", tmp_path)
    _assert_same(_split_run(save_with, load_with, tmp_path), ref)
    fresh = _split_run(save_with, load_with, tmp_path, load_state=False)
    assert not torch.allclose(fresh["w"], ref["w"])  # the loaded moments mattered


def test_shared_adam_loaded_state_keeps_its_learning_rate(tmp_path):
    """A parameter whose saved hyperparameters differ from the optimizer's
    gets a group of its own with them."""
    from pyro_binary_grads.optim import Adam

    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    store = pyro.get_param_store()
    store["a"], store["b"] = a, b
    a, b = store["a"].unconstrained(), store["b"].unconstrained()
    saved = pyro.optim.Adam(lambda name: {"lr": 0.5 if name == "a" else 0.1})
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    saved({a, b})
    ours = Adam({"lr": 0.1})
    ours.set_state(saved.get_state())
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    ours({a, b})
    groups = ours.optimizer.param_groups
    assert sorted((g["lr"], len(g["params"])) for g in groups) == [(0.1, 1), (0.5, 1)]
    assert ours.get_state()["a"]["param_groups"][0]["lr"] == 0.5
    assert int(ours.get_state()["b"]["state"][0]["step"]) == 2


def test_shared_adam_steps_only_this_steps_parameters():
    """As pyro.optim: a parameter not in this step's set is not stepped, even
    with a gradient in place, and keeps that gradient."""
    from pyro_binary_grads.optim import Adam

    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    optim = Adam({"lr": 0.1})
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    optim({a, b})
    b_after, g = b.detach().clone(), torch.full((2,), 7.0)
    a.grad, b.grad = torch.ones(3), g
    optim({a})
    assert torch.equal(b.detach(), b_after) and b.grad is g
    assert a.grad is None and not torch.equal(a.detach(), torch.zeros(3))


def test_shared_adam_set_to_none_off_leaves_zeros_as_pyro():
    from pyro_binary_grads.optim import Adam

    ref, _ = _trajectory(lambda: pyro.optim.Adam({"lr": 0.05}))
    ours, optim = _trajectory(lambda: Adam({"lr": 0.05}, set_to_none=False))
    _assert_same(ours, ref)
    assert all(p.grad is not None and not p.grad.any() for p in optim.optim_objs)
