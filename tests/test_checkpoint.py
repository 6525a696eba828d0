"""
A training run split by a checkpoint and resumed (``--checkpoint-every``,
``--resume``; ``examples/checkpoint.py``) ends where an uninterrupted run
ends: same minibatches, same noise, same optimizer state, so the same
parameters and training curve (NumPyro exactly; Pyro to float rounding).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import sbn  # noqa: E402
from data import load_mnist  # noqa: E402

STEPS, EVERY = 40, 15


class Stop(Exception):
    pass


def _run(backend, out, *, stop_at=None, resume=False, estimator="disarm", eval_every=STEPS):
    """Train ``STEPS`` steps of the SBN (a checkpoint every ``EVERY``);
    ``stop_at``: interrupt the run when that batch is drawn."""
    args = sbn.parse_args(["--backend", backend, "--estimator", estimator, "--num-steps",
                           str(STEPS), "--eval-every", str(eval_every), "--batch-size", "20",
                           "--no-progress", "--out", str(out), "--checkpoint-every",
                           str(EVERY)] + (["--resume"] if resume else []))
    train = load_mnist(args.data, args.binarize, "train")
    args.num_data = len(train)
    bk, model, guide, trainer = sbn.build(args, train)
    rng = np.random.default_rng(args.seed + 1000)

    def batches():
        for i, b in enumerate(train.batches(args.batch_size, rng, args.num_steps), 1):
            if i == stop_at:
                raise Stop
            yield b

    def step_args(b):
        return bk.asarray(b[1]), bk.asarray(b[0]), float(len(train))

    history, tests, _, _ = common.train(args, trainer, batches(), step_args, lambda s: 0.0,
                                        f"{backend}/ckpt")
    params = {k: np.asarray(v, np.float64) for k, v in trainer.snapshot().items()
              if not isinstance(v, dict)}  # RELAX's network (NumPyro) is a nested dict
    return history, params, args


@pytest.mark.parametrize("estimator", ["disarm", "rebar"])
@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_resumed_run_equals_uninterrupted_run(backend, estimator, tmp_path):
    """``rebar``: a class that inspects the guide on first use and adapts its own
    parameters (Pyro's first-use inspection once shifted the global RNG)."""
    full_hist, full, _ = _run(backend, tmp_path / "full", estimator=estimator)
    with pytest.raises(Stop):  # checkpoint at step 30
        _run(backend, tmp_path / "split", stop_at=2 * EVERY + 5, estimator=estimator)
    assert (tmp_path / "split" / f"{backend}_ckpt.ckpt").exists()
    hist, params, args = _run(backend, tmp_path / "split", resume=True, estimator=estimator)
    assert args.resumed_at == [2 * EVERY]
    assert not (tmp_path / "split" / f"{backend}_ckpt.ckpt").exists()  # removed at the end
    assert [h[0] for h in hist] == list(range(1, STEPS + 1))
    tol = 0 if backend == "numpyro" else 1e-5
    np.testing.assert_allclose([h[1] for h in hist], [h[1] for h in full_hist], rtol=tol)
    for k in full:
        np.testing.assert_allclose(params[k], full[k], rtol=tol, atol=tol)
    moved = max(float(np.max(np.abs(full[k] - params0))) for k, params0 in
                [(k, _initial(backend, k)) for k in ("enc0_b",)])
    assert moved > 0  # training moved the parameters that are compared


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_adapted_values_are_recorded_across_a_resume(backend, tmp_path):
    """REBAR's adapted temperature and eta, kept at each evaluation (``args.adapted``,
    the run record's ``adapted``), survive the checkpoint: the resumed run's list
    equals the uninterrupted run's, and its last entry is the trained value."""
    _, full, full_args = _run(backend, tmp_path / "full", estimator="rebar", eval_every=10)
    with pytest.raises(Stop):
        _run(backend, tmp_path / "split", stop_at=2 * EVERY + 5, estimator="rebar",
             eval_every=10)
    _, _, args = _run(backend, tmp_path / "split", resume=True, estimator="rebar",
                      eval_every=10)
    assert [s for s, _ in full_args.adapted] == [0, 10, 20, 30, 40]
    assert [s for s, _ in args.adapted] == [0, 10, 20, 30, 40]
    names = {"_bg_b1_temperature", "_bg_b1_eta"}
    assert full_args.adapted[0][1] == pytest.approx({"_bg_b1_temperature": 0.5, "_bg_b1_eta": 1.0})
    tol = 0 if backend == "numpyro" else 1e-5
    for (_, mine), (_, theirs) in zip(args.adapted, full_args.adapted):
        assert set(mine) == names
        for k in names:
            assert mine[k] == pytest.approx(theirs[k], rel=tol, abs=tol)
    last = full_args.adapted[-1][1]
    assert abs(last["_bg_b1_temperature"] - 0.5) > 1e-3  # trained, not the initial value


@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_relax_records_its_temperature_and_eta_not_its_network(backend, tmp_path):
    """RELAX's control-variate network is a ``_bg_*`` parameter too (a nested dict
    in NumPyro, one entry per tensor in Pyro): the record keeps only the scalars."""
    _, _, args = _run(backend, tmp_path, estimator="relax", eval_every=20)
    assert [s for s, _ in args.adapted] == [0, 20, 40]
    for _, values in args.adapted:
        assert set(values) == {"_bg_b1_temperature", "_bg_b1_eta"}
        assert all(np.isfinite(v) for v in values.values())


def _initial(backend, name):
    args = sbn.parse_args(["--backend", backend, "--estimator", "disarm"])
    train = load_mnist(args.data, args.binarize, "train")
    return np.asarray(sbn.init_params(args, train, np.random.default_rng(args.seed))[name])


def test_resume_with_other_settings_is_refused(tmp_path):
    with pytest.raises(Stop):
        _run("numpyro", tmp_path, stop_at=EVERY + 2)
    args = sbn.parse_args(["--backend", "numpyro", "--estimator", "arm", "--num-steps",
                           str(STEPS), "--out", str(tmp_path), "--checkpoint-every", str(EVERY),
                           "--batch-size", "20", "--resume", "--no-progress"])
    train = load_mnist(args.data, args.binarize, "train")
    args.num_data = len(train)
    bk, model, guide, trainer = sbn.build(args, train)
    with pytest.raises(SystemExit, match="other settings.*estimator"):
        common.train(args, trainer, iter(()), None, lambda s: 0.0, "numpyro/ckpt")
