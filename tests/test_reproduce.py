"""``benchmarks/reproduce.py`` and the examples' drift fields: the check that would have caught
ReinMax-CV's collapse at the full budget (issue 16). A run whose training objective's last
tenth is more than 2 nats below its best tenth is marked in RESULTS.md and the docs page;
a run that only improves is not."""
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import reproduce  # noqa: E402


def _history(collapse, steps=1000):
    """An ELBO curve (step, objective) that rises from -200 to -125 by 25 % of the run and
    then slowly to -122; with ``collapse`` it falls to -158 instead (the shape measured in
    issue 16)."""
    t = np.arange(1, steps + 1) / steps
    rise = -200 + 75 * np.minimum(t / 0.25, 1.0)
    late = np.clip((t - 0.25) / 0.75, 0, 1)
    y = rise + (-33 * late if collapse else 3 * late)
    return [(int(s), float(v)) for s, v in zip(range(1, steps + 1), y)]


def test_drift_summary_flags_a_collapse_and_not_a_rise():
    bad = common.drift_summary(_history(collapse=True))
    good = common.drift_summary(_history(collapse=False))
    assert bad["train_objective_drift"] > 20 and bad["best_tenth_index"] == 2
    assert good["train_objective_drift"] == 0.0 and good["best_tenth_index"] == 9
    assert -123 < good["train_objective_last_tenth"] < -122
    # too short to cut in tenths: no figure rather than a wrong one
    assert common.drift_summary(_history(False, steps=5))["train_objective_drift"] is None


def _record(name, seed, history):
    return {"name": name, "seed": seed, "budget": "full", "wall_s": 1.0, "cmd": "x",
            "date": "2026-12-03", "backend": "numpyro", "steps": len(history),
            "ms_per_step": 1.0, "train_objective_last10pct": history[-1][1],
            "train_objective_last_epoch": history[-1][1], "test_elbo": history[-1][1] - 1,
            "test_bound_100": history[-1][1] + 5, **common.drift_summary(history),
            "curve": reproduce.binned(history), "tests": [[0, -540.0], [len(history), -120.0]]}


def test_render_marks_the_drifting_run_only(tmp_path):
    results = tmp_path / "results"
    (results / "full").mkdir(parents=True)
    recs = [_record("cvae_8x4_reinmax_cv", 0, _history(False)),
            _record("cvae_8x4_reinmax_cv", 1, _history(True)),
            _record("cvae_8x4_reinmax", 0, _history(False))]
    for r in recs:
        reproduce.record_path(results, "full", r["name"], r["seed"]).write_text(json.dumps(r))
    md = tmp_path / "RESULTS.md"
    plots = tmp_path / "docs" / "results"
    setups = reproduce.render(reproduce.load_records(results, "full"),
                              reproduce.configs("full"), "full", md, plots)
    assert setups == ["cvae_8x4"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.read_text().splitlines()
            if line.startswith("| reinmax")}
    assert "**drift** (seeds 1)" in rows["reinmax_cv"]
    assert "drift" not in rows["reinmax"]
    assert "124.94 (0.77) / 126.63 (0.71)" in rows["reinmax_cv"]  # the released means beside
    assert (plots / "full_cvae_8x4.png").stat().st_size > 0
    rst = (tmp_path / "docs" / "results.rst").read_text()
    assert "drift" in rst and "seeds 1" in rst
    # what has no record is listed as not run yet, with its missing seeds
    assert "`cvae_8x4_reinmax` (seeds 1,2)" in md.read_text()


def test_existing_refuses_another_backends_record(tmp_path):
    rec = _record("cvae_8x4_reinmax", 0, _history(False))
    path = reproduce.record_path(tmp_path, "full", rec["name"], 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**rec, "backend": "pyro"}))
    assert not reproduce.existing(tmp_path, "full", rec["name"], 1, "numpyro")
    try:
        reproduce.existing(tmp_path, "full", rec["name"], 0, "numpyro")
    except SystemExit as e:
        assert "pyro run" in str(e)
    else:
        raise AssertionError("a Pyro record was taken for a NumPyro run")
    path.write_text(json.dumps({**rec, "backend": "torch (the authors' loop)"}))  # references
    assert reproduce.existing(tmp_path, "full", rec["name"], 0, "numpyro")


def test_hand_written_notes_are_kept_and_reach_the_docs_page(tmp_path):
    import docutils.core
    import io

    results = tmp_path / "results"
    (results / "full").mkdir(parents=True)
    rec = _record("cvae_8x4_reinmax", 0, _history(False))
    reproduce.record_path(results, "full", rec["name"], 0).write_text(json.dumps(rec))
    md = tmp_path / "RESULTS.md"
    notes = ("\n## Why a row misses\n\nSee `tests/x.py` and [the paper](https://a.b/c).\n\n"
             "| step | ours | theirs |\n|---|---|---|\n| 100k | -1.0 / -2.0 | |\n\n"
             "![why](docs/results/why.png)\n\n- a bullet with **bold**\n\n")
    small = "## Earlier small-budget runs (Pyro backend)\n\nold table\n"
    md.write_text("stale generated part\n" + reproduce.HAND_WRITTEN + notes + small)
    reproduce.render(reproduce.load_records(results, "full"), reproduce.configs("full"),
                     "full", md, tmp_path / "docs" / "results")
    text = md.read_text()
    assert "stale generated part" not in text
    assert text.endswith(reproduce.HAND_WRITTEN + notes + small)  # kept as written
    rst = (tmp_path / "docs" / "results.rst").read_text()
    assert "Why a row misses\n----------------" in rst
    assert "``tests/x.py``" in rst and "`the paper <https://a.b/c>`_" in rst
    assert ".. list-table::" in rst and "     - -1.0 / -2.0" in rst and "     - -\n" in rst
    assert ".. image:: results/why.png" in rst
    assert "old table" not in rst and "small-budget" not in rst  # the full-budget notes only
    warnings = io.StringIO()
    docutils.core.publish_doctree(rst, settings_overrides={"warning_stream": warnings,
                                                           "report_level": 2})
    assert warnings.getvalue() == ""
