"""
An ELBO's first-use work (finding the discrete sites, checking the program,
compiling) leaves torch's global RNG as it found it: a fresh instance's first
step draws what an instance that has seen the program draws. Without this a
training run resumed from a checkpoint with a fresh ELBO takes other noise
than the uninterrupted run (``tests/test_checkpoint.py``; REBAR's and the
categorical classes' site inspection drew from the global RNG until 2026-12-07).
"""

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine

import pyro_binary_grads as bg

CLASSES = [getattr(bg, n) for n in bg.__all__
           if n.endswith(("_ELBO", "_IWAE", "VIMCO")) and not n.startswith("Jit")]
#: the compiled classes run their first step eagerly (noise from a seeded
#: generator) and later steps replayed (noise from ``torch.rand`` in the trace), so a
#: warm instance draws other numbers, from the same distribution, by design
COMPILED = [getattr(bg, n) for n in bg.__all__ if n.startswith("Jit")]


def _program(one_hot):
    def guide():
        q = pyro.param("q", torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0]]))
        with pyro.plate("data", 2):
            if one_hot:
                pyro.sample("z", bg.OneHotCategorical(logits=q))
            else:
                pyro.sample("z", dist.Bernoulli(logits=q).to_event(1))

    def model():
        w = pyro.param("w", torch.tensor([0.7, -1.1, 0.4]))
        with pyro.plate("data", 2):
            z = pyro.sample("z", bg.OneHotCategorical(logits=torch.zeros(3)) if one_hot
                            else dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("x", dist.Normal((z * w).sum(-1), 1.0), obs=torch.tensor([0.5, -0.3]))

    return model, guide


def _program_for(cls):
    """The Bernoulli program, or the one-hot one for a class without Bernoulli sites."""
    pyro.clear_param_store()
    model, guide = _program(one_hot=False)
    try:
        cls().loss(model, guide)
    except (ValueError, NotImplementedError):
        return _program(one_hot=True)
    return model, guide


def _step_draws(cls, program, warm):
    """(loss, the next global draw) of one step of a new instance from seed 1,
    after one step from seed 0 when ``warm``."""
    pyro.clear_param_store()
    model, guide = program
    elbo = cls()
    wrap = getattr(elbo, "wrap_guide", None)
    guide = (wrap(guide) if wrap else None) or guide
    with poutine.block():
        guide()  # params declared (RELAX's net initialised), as before an optimizer
    if warm:
        torch.manual_seed(0)
        elbo.loss_and_grads(model, guide)
    torch.manual_seed(1)
    loss = elbo.loss_and_grads(model, guide)
    return float(loss), float(torch.rand(()))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_first_step_draws_as_a_warm_instance(cls):
    program = _program_for(cls)
    fresh = _step_draws(cls, program, warm=False)
    warm = _step_draws(cls, program, warm=True)
    assert fresh == warm


@pytest.mark.parametrize("cls", COMPILED, ids=lambda c: c.__name__)
def test_compiled_first_step_draws_as_the_eager_class(cls):
    eager = getattr(bg, cls.__name__[len("Jit"):])
    program = _program_for(eager)
    assert _step_draws(cls, program, warm=False) == _step_draws(eager, program, warm=False)


def test_preserved_rng_rewinds_the_draws_made_inside():
    """``structure.preserved_rng`` restores the state, also after an error."""
    from pyro_binary_grads.structure import preserved_rng

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with preserved_rng():
        torch.rand(10)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError), preserved_rng():
        torch.rand(10)
        raise RuntimeError
    assert torch.equal(torch.rand(4), expected)
