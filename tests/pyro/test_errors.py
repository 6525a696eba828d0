"""Bad input gets an error that names the site and says what to do."""

import math
import warnings

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_binary_grads import ARM_ELBO, DisARM_ELBO

ELBOS = [ARM_ELBO, DisARM_ELBO]


def _guide_with(fn, infer=None):
    def guide():
        pyro.param("a", torch.tensor(0.3))
        pyro.sample("z", fn(), infer=infer or {})

    return guide


def _model_bern():
    pyro.sample("z", dist.Bernoulli(logits=torch.tensor(0.0)))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


@pytest.mark.parametrize("Elbo", ELBOS)
def test_poisson_site_is_refused(Elbo):
    def model():
        pyro.sample("z", dist.Poisson(2.0))

    guide = _guide_with(lambda: dist.Poisson(pyro.param("a").exp()))
    with pytest.raises(NotImplementedError, match="'z'.*Poisson.*TraceGraph_ELBO"):
        Elbo().differentiable_loss(model, guide)


@pytest.mark.parametrize("Cat", [dist.Categorical, dist.OneHotCategorical])
def test_categorical_site_is_refused_by_arm_with_alternatives(Cat):
    def model():
        pyro.sample("z", Cat(logits=torch.zeros(3)))

    guide = _guide_with(lambda: Cat(logits=pyro.param("a") * torch.ones(3)))
    with pytest.raises(NotImplementedError, match="'z'.*Categorical.*DisARM_ELBO.*RLOO_ELBO"):
        ARM_ELBO().differentiable_loss(model, guide)


@pytest.mark.parametrize("Elbo", ELBOS)
def test_enumerated_site_is_refused(Elbo):
    guide = _guide_with(
        lambda: dist.Bernoulli(logits=pyro.param("a")), infer={"enumerate": "parallel"}
    )
    with pytest.raises(ValueError, match="'z'.*enumerat.*TraceEnum_ELBO"):
        Elbo().differentiable_loss(_model_bern, guide)


@pytest.mark.parametrize("Elbo", ELBOS)
def test_nan_logits_are_refused(Elbo):
    """(Infinite Bernoulli logits are a certain unit, accepted:
    tests/test_certain_outcomes.py, which also has the refused categorical rows.)"""
    bad = math.nan
    elbo = Elbo()
    state = {"bad": False}

    def guide():
        a = pyro.param("a", torch.tensor(0.3))
        if state["bad"]:
            a = a * bad
        pyro.sample("z", dist.Bernoulli(logits=a))

    elbo.differentiable_loss(_model_bern, guide)  # a first, good step
    state["bad"] = True
    with pytest.raises(ValueError, match="'z'.*NaN or infinite logits"):
        elbo.differentiable_loss(_model_bern, guide)


@pytest.mark.parametrize("Elbo", ELBOS)
def test_non_reparameterized_continuous_site_is_refused(Elbo):
    class NoRsample(dist.Normal):
        has_rsample = False

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    guide = _guide_with(lambda: NoRsample(pyro.param("a"), 1.0))
    with pytest.raises(NotImplementedError, match="'z'.*neither reparameterizable"):
        Elbo().differentiable_loss(model, guide)


def _sbn(reduce_over_leading):
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])

    def model():
        w = pyro.param("w", torch.tensor([0.4, -0.3, 0.2]))
        with pyro.plate("data", 2):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.1)))
            if reduce_over_leading:
                # mis-broadcast: mixes the leading (evaluation) dim into the plate
                b = b.reshape(-1)[-2:]
            pyro.sample("x", dist.Bernoulli(logits=b[..., None] * w).to_event(1), obs=x)

    def guide():
        v = pyro.param("v", torch.tensor([0.5, -0.5, 0.3]))
        with pyro.plate("data", 2):
            pyro.sample("b", dist.Bernoulli(logits=x @ v))

    return model, guide


@pytest.mark.parametrize("Elbo", ELBOS)
@pytest.mark.parametrize("validation", [True, False])
def test_model_that_does_not_broadcast_over_evaluations_runs_sequentially(Elbo, validation):
    """Detected on the first step whatever the validation setting, with one
    warning naming the site; the draw then equals vectorize=False's."""
    model, guide = _sbn(reduce_over_leading=True)
    elbo = Elbo()
    with pyro.validation_enabled(validation):
        pyro.set_rng_seed(5)
        with pytest.warns(UserWarning, match="'x'.*does not broadcast.*sequentially"):
            loss = elbo.differentiable_loss(model, guide)
        pyro.set_rng_seed(5)
        expected = Elbo(vectorize=False).differentiable_loss(model, guide)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            elbo.differentiable_loss(model, guide)  # one warning only
    assert abs(loss.item() - expected.item()) < 1e-12


@pytest.mark.parametrize("Elbo", ELBOS)
def test_well_broadcasting_model_passes_the_check(Elbo):
    model, guide = _sbn(reduce_over_leading=False)
    loss = Elbo().differentiable_loss(model, guide)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("Elbo", ELBOS)
def test_structure_change_between_steps_is_followed(Elbo):
    """One instance: a guide that gains a site is found again (no error)."""
    state = {"second": False}

    def guide():
        a = pyro.param("a", torch.tensor(0.3))
        pyro.sample("z", dist.Bernoulli(logits=a))
        if state["second"]:
            pyro.sample("y", dist.Bernoulli(logits=a))

    def model():
        pyro.sample("z", dist.Bernoulli(logits=torch.tensor(0.0)))
        if state["second"]:
            pyro.sample("y", dist.Bernoulli(logits=torch.tensor(0.0)))

    elbo = Elbo()
    elbo.differentiable_loss(model, guide)
    state["second"] = True
    loss = elbo.differentiable_loss(model, guide)
    assert list(elbo._structure.discrete) == ["z", "y"]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("Elbo", ELBOS)
def test_model_latent_missing_from_guide_is_refused(Elbo):
    def model():
        pyro.sample("z", dist.Bernoulli(logits=torch.tensor(0.0)))
        pyro.sample("w", dist.Normal(0.0, 1.0))

    guide = _guide_with(lambda: dist.Bernoulli(logits=pyro.param("a")))
    with pytest.raises(ValueError, match="'w'.*not in the guide"):
        Elbo().differentiable_loss(model, guide)


def test_global_site_after_local_discrete_in_subsampled_plate_warns_and_sums():
    """Supported in Pyro (NumPyro refuses it): the signal of 'b' is summed over
    the subsampled plate, with the warning."""
    def guide():
        a = pyro.param("a", torch.zeros(4))
        with pyro.plate("data", 4, subsample_size=2) as idx:
            b = pyro.sample("b", dist.Bernoulli(logits=a[idx]))
        pyro.sample("g", dist.Normal(b.sum(-1, keepdim=True), 1.0))

    def model():
        with pyro.plate("data", 4, subsample_size=2):
            pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.0)))
        pyro.sample("g", dist.Normal(0.0, 1.0))

    with pytest.warns(RuntimeWarning, match="'g'.*outside plate 'data'.*summed"):
        loss = DisARM_ELBO().differentiable_loss(model, guide)
    assert torch.isfinite(loss)


def test_global_site_after_local_discrete_warns_and_sums():
    def guide():
        a = pyro.param("a", torch.zeros(3))
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Bernoulli(logits=a))
        pyro.sample("g", dist.Normal(b.sum(-1, keepdim=True), 1.0))

    def model():
        with pyro.plate("data", 3):
            pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.0)))
        pyro.sample("g", dist.Normal(0.0, 1.0))

    with pytest.warns(RuntimeWarning, match="'g'.*outside plate 'data'.*summed"):
        DisARM_ELBO().differentiable_loss(model, guide)


@pytest.mark.parametrize("Elbo", ELBOS)
def test_svi_step_runs(Elbo):
    model, guide = _sbn(reduce_over_leading=False)
    svi = SVI(model, guide, Adam({"lr": 0.01}), Elbo())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step() for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("vectorize", [True, False])
def test_nan_logits_are_named_whatever_the_validation_setting(validation, vectorize):
    model, guide = _sbn(reduce_over_leading=False)
    elbo = DisARM_ELBO(vectorize=vectorize)
    svi = SVI(model, guide, Adam({"lr": 0.01}), elbo)
    svi.step()
    pyro.get_param_store()["v"].data.fill_(math.nan)
    with pyro.validation_enabled(validation):
        with pytest.raises(ValueError, match="'b'.*NaN or infinite logits"):
            svi.step()
