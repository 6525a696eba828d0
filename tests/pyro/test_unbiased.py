"""
ARM_ELBO and DisARM_ELBO against the exact gradient (enumeration + quadrature).

For every (estimator, structure) the mean of many single-step gradients is
within 5 standard errors of the exact gradient in every parameter
coordinate. The standard error comes from >= 30 batch means of vectorized
particles, and every case checks its own power: a 10% scaling bias would
be detected with probability >= 99.9% (``max_i 0.1 |g_i| / se_i >= 8.1``).
"""

import numpy as np
import pytest
import torch

import pyro

import specs
import stats
from pyro_oracle import exact_value_and_grads, init_params
from pyro_binary_grads import ARM_ELBO, DisARM_ELBO, RLOO_ELBO

ELBOS = {"arm": ARM_ELBO, "disarm": DisARM_ELBO}


def flat_grads(loss, names):
    store = pyro.get_param_store()
    params = [store[k].unconstrained() for k in names]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return np.concatenate(
        [
            np.zeros(p.numel()) if g is None else g.detach().double().flatten().numpy()
            for p, g in zip(params, grads)
        ]
    )


def exact_flat(spec):
    _, grads = exact_value_and_grads(spec, loss=True)
    names = sorted(grads)
    exact = np.concatenate([grads[k].flatten() for k in names])
    guide = np.concatenate([np.full(grads[k].size, k.startswith("q_")) for k in names])
    return names, Exact(exact, guide, coordinate_labels({k: grads[k].shape for k in names}))


def coordinate_labels(shapes):
    """``{name: shape}`` (in flattening order) -> one label per flat
    coordinate: ``name`` for a scalar, ``name[i,j]`` for an element."""
    labels = []
    for k, shape in shapes.items():
        shape = tuple(shape)
        if not shape:
            labels.append(k)
        else:
            labels += [f"{k}[{','.join(map(str, i))}]" for i in np.ndindex(shape)]
    return labels


class Exact(np.ndarray):
    """The exact gradient, flattened, with a mask of the guide coordinates
    and (optionally) a label per coordinate (:func:`coordinate_labels`)."""

    def __new__(cls, values, guide, labels=None):
        obj = np.asarray(values).view(cls)
        obj.guide = guide
        obj.labels = None if labels is None else list(labels)
        return obj

    def __array_finalize__(self, obj):
        self.guide = getattr(obj, "guide", None)
        self.labels = getattr(obj, "labels", None)

    def indices(self, coords):
        """Flat indices of ``coords``: ints, coordinate labels (``"q_a[0,1]"``)
        or parameter names (``"q_a"``: every coordinate of it)."""
        out = []
        for c in coords:
            if isinstance(c, (int, np.integer)):
                out.append(int(c))
                continue
            if self.labels is None:
                raise ValueError(f"coordinate {c!r} named, but the exact gradient has no labels")
            hit = [i for i, lab in enumerate(self.labels)
                   if lab == c or lab.startswith(c + "[")]
            if not hit:
                raise ValueError(f"no coordinate {c!r} among {self.labels}")
            out += hit
        return out


def gradient_draws(elbo, spec, names, num_calls, num_batches=30):
    """``num_batches`` batch means of the gradients of ``num_calls`` calls of
    ``elbo.differentiable_loss`` (each itself a mean over its particles)."""
    model, guide, args = spec.bind(specs.pyro_backend())
    rows = [
        flat_grads(elbo.differentiable_loss(model, guide, *args), names)
        for _ in range(num_calls)
    ]
    return stats.batch_means(np.stack(rows), num_batches)


def check(draws, exact, label, powered=None):
    """
    The unbiasedness check, with its power computed on the guide
    coordinates (the estimator's part; model gradients are pathwise).

    By default the best-powered guide coordinate must reach
    ``0.1 |exact_i| / se_i >= 8.1``. A test about specific sites passes
    ``powered``, a list of coordinates (flat indices, coordinate labels such
    as ``"q_a[0,1]"``, or parameter names meaning all their coordinates):
    then **each** of them must reach it, so a wrong gradient at the site
    under test would fail.
    """
    result = stats.check_unbiased(draws, np.asarray(exact))
    se = np.where(result.se > 0, result.se, np.inf)
    power = 0.1 * np.abs(result.exact) / se
    if powered is None:
        best = np.max(power[exact.guide])
        print(f"{label}: max|z| = {result.max_abs_z:.2f}, guide power = {best:.1f}")
        assert best >= 8.1, f"too little power against a 10% bias: {best:.2f}"
        return result
    idx = exact.indices(powered)
    labels = exact.labels or [str(i) for i in range(len(power))]
    text = ", ".join(f"{labels[i]} {power[i]:.1f}" for i in idx)
    print(f"{label}: max|z| = {result.max_abs_z:.2f}, power: {text}")
    weak = [labels[i] for i in idx if not power[i] >= 8.1]
    assert not weak, f"too little power against a 10% bias at {weak}: {text}"
    return result


STRUCTURES = [
    # (spec name, particles per call, calls)
    ("scalar", 2000, 30),
    ("sbn", 2000, 30),
    ("nested", 2000, 30),
    ("subsample", 50, 3600),  # the subsample choice dominates the variance
    ("masked", 2000, 30),
    ("two_layer", 2000, 30),
    ("mixed", 2000, 30),
    ("zero_logits", 2000, 30),
    ("scaled", 2000, 30),
]


@pytest.mark.parametrize("name", ["arm", "disarm"])
@pytest.mark.parametrize("spec_name,particles,calls", STRUCTURES)
def test_unbiased(name, spec_name, particles, calls):
    spec = specs.SPECS[spec_name]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = ELBOS[name](num_particles=particles, vectorize_particles=True)
    draws = gradient_draws(elbo, spec, names, calls)
    check(draws, exact, f"{name} {spec_name}")


@pytest.mark.parametrize("name", ["arm", "disarm"])
@pytest.mark.parametrize("spec_name", ["global_after_local", "global_after_local_discrete"])
def test_unbiased_with_global_site_after_local_ones(name, spec_name):
    """The trap of DESIGN.md point 4: the signal is summed over the plate."""
    spec = specs.SPECS[spec_name]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = ELBOS[name](num_particles=2000, vectorize_particles=True)
    with pytest.warns(RuntimeWarning, match="summed"):
        draws = gradient_draws(elbo, spec, names, 30)
    check(draws, exact, "check")


@pytest.mark.parametrize(
    "name,vectorize_particles", [("arm", True), ("disarm", True), ("disarm", False)]
)
def test_unbiased_num_particles_4(name, vectorize_particles):
    spec = specs.SPECS["sbn"]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = ELBOS[name](num_particles=4, vectorize_particles=vectorize_particles)
    draws = gradient_draws(elbo, spec, names, 1200)
    check(draws, exact, f"{name} num_particles=4 vectorize_particles={vectorize_particles}")


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_unbiased_sequential(name):
    spec = specs.SPECS["two_layer"]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = ELBOS[name](num_particles=2000, vectorize_particles=True, vectorize=False)
    draws = gradient_draws(elbo, spec, names, 30)
    check(draws, exact, "check")


def test_unbiased_float32():
    spec = specs.SPECS["sbn"]()
    names, exact = exact_flat(spec)
    torch.set_default_dtype(torch.float32)
    init_params(spec)
    store = pyro.get_param_store()
    for k in names:  # float32 copies of the float64 initial values
        store[k] = store[k].detach().float()
    elbo = DisARM_ELBO(num_particles=2000, vectorize_particles=True)
    model, guide, args = spec.bind(specs.pyro_backend())
    assert args[0].dtype == torch.float32
    draws = gradient_draws(elbo, spec, names, 30)
    check(draws, exact, "check")


def test_check_detects_a_10_percent_bias():
    """The same check, on DisARM's draws scaled by 1.1, must fail."""
    spec = specs.SPECS["sbn"]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = DisARM_ELBO(num_particles=2000, vectorize_particles=True)
    draws = gradient_draws(elbo, spec, names, 30)
    check(draws, exact, "check")
    with pytest.raises(AssertionError):
        stats.check_unbiased(1.1 * draws, np.asarray(exact))


def test_vectorized_and_sequential_agree_exactly():
    """Same noise, no continuous site after a flipped one: the discrete
    sites' (guide) gradients are equal to 1e-10. (The value and the pathwise
    part differ by design: the sequential path, whose number of evaluations
    may depend on the draw, averages evaluations 0 and 1 only.)"""
    spec = specs.SPECS["two_layer"]()
    init_params(spec)
    names = sorted(k for k in pyro.get_param_store().keys() if k.startswith("q_"))
    model, guide, args = spec.bind(specs.pyro_backend())
    out = []
    for vectorize in (True, False):
        pyro.set_rng_seed(3)
        elbo = DisARM_ELBO(num_particles=7, vectorize_particles=True, vectorize=vectorize)
        loss = elbo.differentiable_loss(model, guide, *args)
        out.append(flat_grads(loss, names))
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-10)


RLOO_STRUCTURES = [
    ("scalar", 2000, 30),
    ("sbn", 2000, 30),
    ("two_layer", 2000, 30),
    ("subsample", 50, 3600),
    ("mixed", 2000, 30),
    ("categorical", 2000, 30),
    ("categorical_plate", 2000, 30),
]


@pytest.mark.parametrize("spec_name,particles,calls", RLOO_STRUCTURES)
def test_unbiased_rloo(spec_name, particles, calls):
    spec = specs.SPECS[spec_name]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = RLOO_ELBO(particles, vectorize_particles=True, num_samples=3)
    draws = gradient_draws(elbo, spec, names, calls)
    check(draws, exact, f"rloo {spec_name}")


def test_rloo_one_hot_categorical_sites():
    """OneHotCategorical sites in a data plate, against the exact gradient."""
    from pyro_oracle import exact_elbo

    y = torch.tensor([0.8, -0.4])

    def guide():
        a = pyro.param("a", torch.tensor([[0.4, -0.3, 0.1], [-0.6, 0.2, 0.5]]))
        with pyro.plate("data", 2, dim=-1):
            pyro.sample("c", pyro.distributions.OneHotCategorical(logits=a))

    def model():
        p = pyro.param("p", torch.tensor([0.1, 0.0, -0.1]))
        mu = pyro.param("mu", torch.tensor([-1.0, 0.0, 1.0]))
        with pyro.plate("data", 2, dim=-1):
            c = pyro.sample("c", pyro.distributions.OneHotCategorical(logits=p))
            pyro.sample("y", pyro.distributions.Normal((c * mu).sum(-1), 1.0), obs=y)

    names = ["a", "mu", "p"]
    loss = -exact_elbo(model, guide)
    params = [pyro.param(k).unconstrained() for k in names]
    grads = torch.autograd.grad(loss, params)
    exact = Exact(
        torch.cat([g.flatten() for g in grads]).numpy(),
        np.array([True] * 6 + [False] * 6),
    )
    elbo = RLOO_ELBO(2000, vectorize_particles=True, num_samples=3)
    rows = []
    for _ in range(30):
        loss = elbo.differentiable_loss(model, guide)
        rows.append(flat_grads(loss, names))
    check(np.stack(rows), exact, "rloo one-hot")


@pytest.mark.parametrize(
    "spec_name", ["categorical", "categorical_plate", "onehot_plate", "onehot_two_layer"]
)
def test_disarm_categorical_unbiased(spec_name):
    """DisARM's stick-breaking coupling with importance weights (Dong et al.
    2021) on Categorical and OneHotCategorical sites: 2 sites with 3 and 4
    classes (one depending on the other), a data plate, two one-hot layers."""
    spec = specs.SPECS[spec_name]()
    names, exact = exact_flat(spec)
    init_params(spec)
    elbo = DisARM_ELBO(num_particles=2000, vectorize_particles=True)
    draws = gradient_draws(elbo, spec, names, 30)
    check(draws, exact, f"disarm {spec_name}")


def test_disarm_categorical_variance_against_rloo():
    """Equal cost (two evaluations per site): the categorical DisARM's guide
    gradient variance next to RLOO's with two samples (printed)."""
    spec = specs.SPECS["onehot_plate"]()
    names, exact = exact_flat(spec)
    init_params(spec)
    out = {}
    for label, elbo in [("disarm", DisARM_ELBO(num_particles=2000, vectorize_particles=True)),
                        ("rloo", RLOO_ELBO(2000, vectorize_particles=True, num_samples=2))]:
        draws = gradient_draws(elbo, spec, names, 30)
        out[label] = draws.var(0, ddof=1)[exact.guide].sum()
    ratio = out["rloo"] / out["disarm"]
    print(f"guide-gradient variance RLOO(2) / categorical DisARM on onehot_plate: {ratio:.2f}")
    assert np.isfinite(ratio) and ratio > 0
