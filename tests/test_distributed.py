"""
Data-parallel training as ``examples/distributed_sbn.py`` does it, on CPUs.

* Pyro: two ``gloo`` processes, the example's ``ELBOLoss`` under
  ``DistributedDataParallel``. (a) With each rank's slice of one set of
  uniforms (the ELBO's noise hook) the all-reduced gradient equals the
  one-process full-batch gradient (float64, validation on and off). (b) With
  per-rank seeds (``rank_seed``) the ranks draw different noise, their
  parameters stay identical step after step, and the loss falls.
* NumPyro: the batch sharded over two host devices
  (``--xla_force_host_platform_device_count=2``, set before jax is imported,
  hence a subprocess) gives the unsharded loss, gradients and SVI updates to
  float32 rounding.

Every process runs under a wall-clock limit and the process group under a
timeout, so a hung collective fails the test instead of hanging it.
"""

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WALL = 240  # seconds per launch (imports dominate: ~10 s per process when idle)
PG_TIMEOUT = 60  # seconds a collective may wait
N, D, H = 8, 6, 3  # exact-gradient case: data points, pixels, latents
STEPS, N_TRAIN, BATCH = 40, 64, 16  # training case (global batch)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmds_envs, what):
    """Start the processes; kill all and fail if any runs past WALL or fails."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd, env in cmds_envs]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=WALL)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{what}: a process ran past {WALL} s (a hung collective?)")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{what} failed:\n{out[-3000:]}"
    return outs


# ---------------------------------------------------------------------------
# Pyro: two processes


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = str(_free_port())
    jobs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        jobs.append(([sys.executable, __file__, "--pyro-worker", str(out)], env))
    _run(jobs, "2-process DDP run")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def test_ddp_gradient_equals_full_batch_gradient(ddp_results):
    for validation in (True, False):
        ref = ddp_results[0][f"ref_{validation}"]
        for r, res in enumerate(ddp_results):
            grads = res[f"ddp_{validation}"]
            assert set(grads) == set(ref)
            for k in ref:
                np.testing.assert_allclose(
                    grads[k], ref[k], rtol=1e-10, atol=1e-12,
                    err_msg=f"rank {r}, {k}, validation={validation}")
        assert max(float(abs(g).max()) for g in ref.values()) > 1e-3  # not all zero


def test_ddp_ranks_stay_in_sync_and_learn(ddp_results):
    r0, r1 = ddp_results
    # the ranks draw independent noise: on one identical batch, different estimates
    assert r0["same_batch_loss"] != r1["same_batch_loss"]
    for k in r0["params"]:
        assert np.array_equal(r0["params"][k], r1["params"][k]), k
    assert not np.array_equal(r0["params"]["enc0_W"], r0["init"]["enc0_W"])
    # the global-batch loss (per example): the last tenth below the first by
    # more than 5 standard errors of the per-step noise
    loss = (np.asarray(r0["losses"]) + np.asarray(r1["losses"])) / 2 / N_TRAIN
    first, last = loss[: STEPS // 4], loss[-STEPS // 4 :]
    se = np.sqrt(first.var(ddof=1) / len(first) + last.var(ddof=1) / len(last))
    assert first.mean() - last.mean() > 5 * se, (first.mean(), last.mean(), se)


def _tiny_sbn():
    import distributed_sbn as ds

    rng = np.random.default_rng(0)
    P = {"prior_logits": np.zeros(H)}
    ds.common.mlp_init(rng, (H, D), "dec", P)
    ds.common.mlp_init(rng, (D, H), "enc", P)
    args = argparse.Namespace(model="linear1", act="leaky_relu", pm1=False)
    return P, args


def _pyro_worker(out):
    import datetime

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(EXAMPLES))
    import distributed_sbn as ds
    import pyro
    import sbn
    from pyro_binary_grads import DisARM_ELBO

    torch.set_default_dtype(torch.float64)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    P, args = _tiny_sbn()
    data_rng = np.random.default_rng(1)
    x_all = (data_rng.random((N, D)) < 0.5).astype(np.float64)
    u_all = torch.rand(1, N, H, generator=torch.Generator().manual_seed(5))
    res = {}

    def setup():
        bk = ds.ModuleBackend(P, "cpu", torch.float64)
        model, guide = sbn.model_and_guide(bk, args, x_all.mean(0))
        return bk, model, guide

    # (a) one set of uniforms, each rank its slice
    for validation in (True, False):
        pyro.enable_validation(validation)
        if rank == 0:  # the one-process full-batch reference
            bk, model, guide = setup()
            elbo = DisARM_ELBO(max_plate_nesting=1)
            elbo._noise = {"b1": u_all}
            loss = ds.ELBOLoss(bk.module, model, guide, elbo)
            loss(bk.asarray(x_all), bk.asarray(np.arange(N)), float(N)).backward()
            res[f"ref_{validation}"] = {k: p.grad.numpy().copy() for k, p in bk.params().items()}
        bk, model, guide = setup()
        elbo = DisARM_ELBO(max_plate_nesting=1)
        n = N // world
        idx = np.arange(rank * n, (rank + 1) * n)
        elbo._noise = {"b1": u_all[:, idx]}
        ddp = torch.nn.parallel.DistributedDataParallel(
            ds.ELBOLoss(bk.module, model, guide, elbo))
        ddp(bk.asarray(x_all[idx]), bk.asarray(idx), float(N)).backward()
        res[f"ddp_{validation}"] = {k: p.grad.numpy().copy() for k, p in bk.params().items()}

    # (b) per-rank noise, a few Adam steps on a learnable data set
    pyro.enable_validation(False)
    torch.manual_seed(ds.rank_seed(0, rank))
    protos = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], np.float64)
    x_train = protos[np.arange(N_TRAIN) % 2]
    flip = np.random.default_rng(2).random(x_train.shape) < 0.05
    x_train = np.abs(x_train - flip)
    bk, model, guide = setup()
    res["init"] = {k: p.detach().numpy().copy() for k, p in bk.params().items()}
    elbo = DisARM_ELBO(max_plate_nesting=1)
    with torch.no_grad():
        res["same_batch_loss"] = float(ds.ELBOLoss(bk.module, model, guide, elbo)(
            bk.asarray(x_train[:4]), bk.asarray(np.arange(4)), float(N_TRAIN)))
    trainer = ds.DDPTrainer(bk, ds.ELBOLoss(bk.module, model, guide, elbo), world,
                            N_TRAIN, lr=0.05, betas=(0.9, 0.999))
    losses = []
    for idx in ds.sampler_batches(N_TRAIN, BATCH // world, rank, world, 0, STEPS):
        losses.append(trainer.step(bk.asarray(x_train[idx]), bk.asarray(idx), float(N_TRAIN)))
    res["losses"] = losses
    res["params"] = {k: p.detach().numpy().copy() for k, p in bk.params().items()}
    (Path(out) / f"rank{rank}.pkl").write_bytes(pickle.dumps(res))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# NumPyro: two host devices


def test_jax_sharded_update_matches_unsharded(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "0"}
    out = tmp_path / "jax.json"
    _run([([sys.executable, __file__, "--jax-worker", str(out)], env)], "sharded JAX run")
    res = json.loads(out.read_text())
    assert res["num_devices"] == 2
    assert res["input_devices"] == 2  # the batch really is split over both
    assert res["loss_sharded"] == pytest.approx(res["loss"], rel=1e-5)
    for k, g in res["grads"].items():
        np.testing.assert_allclose(res["grads_sharded"][k], g, rtol=1e-4, atol=1e-5,
                                   err_msg=k)
    for k, v in res["params"].items():
        np.testing.assert_allclose(res["params_sharded"][k], v, rtol=1e-4, atol=1e-5,
                                   err_msg=k)
    assert max(abs(np.asarray(g)).max() for g in res["grads"].values()) > 1e-3


def _jax_worker(out):
    sys.path.insert(0, str(EXAMPLES))
    import distributed_sbn as ds  # noqa: F401  (before jax: the example's setup)
    import jax
    import numpyro
    import sbn
    from numpyro_binary_grads import DisARM_ELBO

    import common

    P, args = _tiny_sbn()
    batch_sh, replicated = ds.data_sharding()
    x = (np.random.default_rng(1).random((N, D)) < 0.5).astype(np.float32)
    idx = np.arange(N)
    bk = common.NumPyroBackend(P)
    model, guide = sbn.model_and_guide(bk, args, x.mean(0))
    elbo = DisARM_ELBO()
    key = jax.random.PRNGKey(3)
    loss_fn = jax.jit(jax.value_and_grad(
        lambda p, x, i: elbo.loss(key, p, model, guide, x, i, float(N))))
    params = {k: jax.numpy.asarray(v) for k, v in bk.init.items()}
    loss, grads = loss_fn(params, x, idx)
    xs, ids = jax.device_put(x, batch_sh), jax.device_put(idx, batch_sh)
    loss_s, grads_s = loss_fn(jax.device_put(params, replicated), xs, ids)
    res = {"num_devices": len(jax.devices()), "input_devices": len(xs.sharding.device_set),
           "loss": float(loss), "loss_sharded": float(loss_s),
           "grads": {k: np.asarray(v).tolist() for k, v in grads.items()},
           "grads_sharded": {k: np.asarray(v).tolist() for k, v in grads_s.items()}}
    # three SVI updates of the example's trainer, unsharded and sharded
    for tag, put, rep in (("params", lambda a: a, lambda s: s),
                          ("params_sharded", lambda a: jax.device_put(a, batch_sh),
                           lambda s: jax.device_put(s, replicated))):
        numpyro.set_platform("cpu")
        trainer = common.NumPyroTrainer(bk, model, guide, DisARM_ELBO(),
                                        (x, idx, float(N)), seed=0, lr=0.05)
        trainer.state = rep(trainer.state)
        for _ in range(3):
            trainer.step(put(x), put(idx), float(N))
        res[tag] = {k: np.asarray(v).tolist() for k, v in trainer.snapshot().items()}
    Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "--pyro-worker":
        _pyro_worker(path)
    elif mode == "--jax-worker":
        _jax_worker(path)
    else:
        raise SystemExit(f"unknown mode {mode}")
