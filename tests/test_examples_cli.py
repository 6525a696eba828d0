"""
What a new user meets first: the examples' command line (a summary line and a
JSON line, ``--threads``, no silent overwrite of an earlier run), the
``compare`` progress callback, and the Lightning example (the ``test`` extra
installs Lightning, matplotlib and tqdm, so every example here really runs).
"""

import json
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
