"""
What a new user meets first: the examples' command line (a summary line and a
JSON line, ``--threads``, no silent overwrite of an earlier run), the
``compare`` progress callback, and the Lightning example (the ``test`` extra
installs Lightning, matplotlib and tqdm, so every example here really runs).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WALL = 300
TINY = ["--num-steps", "4", "--hidden", "8", "--eval-size", "20", "--final-eval-size", "20",
        "--eval-samples", "2", "--no-progress"]


def _run(args, **kw):
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=WALL, env={**os.environ, **kw})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args[0]} ran past {WALL} s")


def test_sbn_summary_line_threads_and_no_overwrite(tmp_path):
    cmd = [str(EXAMPLES / "sbn.py"), *TINY, "--out", str(tmp_path), "--threads", "1"]
    p = _run(cmd)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    summary, result = lines[-2], json.loads(lines[-1])  # the JSON line stays last
    for piece in ("train objective", "test 2-sample bound", "ms/step", result["plot"]):
        assert piece in summary, (piece, summary)
    assert Path(result["plot"]).exists() and result["steps"] == 4
    first = Path(result["plot"]).with_suffix(".json").read_text()
    again = _run(cmd)  # refuses: the earlier run's files are kept
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert Path(result["plot"]).with_suffix(".json").read_text() == first
    sys.path.insert(0, str(EXAMPLES))
    import common

    name = Path(result["plot"]).stem
    args = SimpleNamespace(out=tmp_path, overwrite=False)
    with pytest.raises(SystemExit, match="--overwrite"):
        common.check_outputs(args, name)
    args.overwrite = True
    common.check_outputs(args, name)  # --overwrite: allowed


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_distributed_example_runs_on_two_ranks(tmp_path, backend):
    """``examples/distributed_sbn.py`` as the README runs it, on 2 CPU ranks
    (Pyro: ``torchrun --standalone --nproc_per_node=2``, gloo) or 2 host
    devices (NumPyro): sbn.py's summary line, JSON line and plot."""
    script = str(EXAMPLES / "distributed_sbn.py")
    flags = [*TINY, "--out", str(tmp_path), "--batch-size", "8", "--timeout", "120"]
    if backend == "pyro":
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *flags, "--cpu"]
    else:
        cmd = [script, *flags, "--backend", "numpyro", "--host-devices", "2"]
    p = _run(cmd, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.strip().splitlines() if line.strip()]
    result = json.loads(lines[-1])  # rank 0 alone prints
    assert result["world_size"] == 2 and result["local_batch_size"] == 4
    assert result["steps"] == 4 and Path(result["plot"]).exists()
    assert result["dist_backend"] == ("gloo" if backend == "pyro" else "jax.sharding")
    assert "test 2-sample bound" in lines[-2] and "ms/step" in lines[-2]


def test_plot_keeps_every_test_point_and_the_final_bound(tmp_path):
    """The test bound at step 0 (far below the curve's later range), every
    periodic point and the full-test-set bound lie inside the y axis; the
    default evaluation interval gives 11 points (step 0, every tenth)."""
    sys.path.insert(0, str(EXAMPLES))
    import common

    steps = 1000
    history = [(s, -100.0 - 400.0 * math.exp(-s / 20.0)) for s in range(1, steps + 1)]

    class Trainer:
        def step(self, *args):
            return 0.0

    args = SimpleNamespace(num_steps=steps, no_progress=True, num_data=1.0, out=tmp_path)
    _, tests, _, _ = common.train(args, Trainer(), range(steps), lambda b: (),
                                  lambda s: -550.0 if s == 0 else -110.0 + s / 100, "t")
    assert [s for s, _ in tests] == list(range(0, steps + 1, 100))
    lo, hi = common.save_plot(tmp_path / "p.png", history, tests, "title", "test bound",
                              final=(-95.0, 10000))
    assert (tmp_path / "p.png").exists()
    assert lo < -550.0 and hi > -95.0  # the first test point and the final bound


def test_threads_from_argv():
    sys.path.insert(0, str(EXAMPLES))
    import common

    assert common.threads_from_argv([]) == common.DEFAULT_THREADS == 0  # torch's choice
    assert common.threads_from_argv(["--seed", "1", "--threads", "3"]) == 3
    assert common.threads_from_argv(["--threads=0"]) == 0


def test_compare_estimators_reports_each_row_as_it_finishes():
    import pyro
    import torch
    from pyro.infer import TraceGraph_ELBO

    from pyro_binary_grads import DisARM_ELBO, compare_estimators
    from pyro_binary_grads.compare import example_sbn

    pyro.clear_param_store()
    model, guide, data = example_sbn()
    seen = []
    table = compare_estimators(model, guide, data, num_samples=3,
                               estimators=[DisARM_ELBO(), TraceGraph_ELBO()],
                               on_row=lambda row: seen.append((row.name, len(seen))))
    assert seen == [("DisARM_ELBO", 0), ("TraceGraph_ELBO", 1)]
    assert [r.name for r in table] == [name for name, _ in seen]
    assert torch.is_tensor(data)


@pytest.mark.parametrize("package,extra", [("pyro_binary_grads", []),
                                           ("numpyro_binary_grads", ["--fast-compile"])])
def test_compare_command_prints_each_row_as_it_finishes(package, extra):
    """The README's ``python -m <package>.compare --exact``: a progress bar on
    stderr and one line per estimator on stdout, each before the table."""
    p = _run(["-m", f"{package}.compare", "--num-samples", "3", "--exact", *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    rows = [i for i, line in enumerate(lines) if ": " in line and "ms/step, total var" in line]
    names = [lines[i].split(":")[0] for i in rows]
    assert names[0] == "DisARM_ELBO" and names[-1] == "TraceGraph_ELBO", names
    table = [i for i, line in enumerate(lines) if line.startswith("TraceGraph_ELBO") and i > rows[-1]]
    assert table, p.stdout  # the table follows the rows
    assert all("rel bias" in lines[i] for i in rows)  # --exact: the bias on each row
    assert "draw" in p.stderr  # tqdm's bar (unit "draw")


def test_lightning_example_trains(tmp_path):
    import lightning  # noqa: F401  (the test extra installs it; a missing one is a failure)
    p = _run([str(EXAMPLES / "sbn_lightning.py"), "--max-steps", "4", "--hidden", "8",
              "--eval-size", "20", "--eval-samples", "2", "--no-progress",
              "--accelerator", "cpu", "--devices", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["steps"] == 4 and result["strategy"] == "SingleDeviceStrategy"
    assert "test 2-sample bound" in lines[-2]
