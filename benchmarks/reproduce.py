"""
Run the papers' configurations of the examples and render ``RESULTS.md`` from
the run records under ``results/``.

Every finished run writes one small record, ``results/<budget>/<name>_s<seed>.json``
(the example's final JSON line, the command, the wall time, and the training
curve binned to 200 points), committed with the project; ``out/`` (plots, full
curves) stays ignored. A configuration whose record exists is skipped, so the
table fills across sessions; ``RESULTS.md`` and the per-setup training-curve
plots (``docs/results/full_<setup>.png``, all estimators on one axis) are
rendered from ``results/`` alone.

    python benchmarks/reproduce.py --list                   # the configurations
    python benchmarks/reproduce.py --only disarm_linear1 --jobs 2
    python benchmarks/reproduce.py --budget small           # 5,000-step pipeline check
    python benchmarks/reproduce.py --render-only

The full budgets run on the NumPyro backend by default (about 1.0-1.6 ms/step
for the DisARM-paper SBN and 4.5 ms/step for the ReinMax harness on one core;
the Pyro backend is 10-50x slower per step here). Runs are one-thread
subprocesses; ``--jobs 2`` runs two at once on two cores.

Setups (../shared/REFERENCE_RESULTS.md gives the papers' exact setups):

* ``disarm_*``: DisARM paper (Dong, Mnih & Tucker 2020), ``examples/sbn.py
  --preset disarm``: dynamic MNIST, batch 50, Adam 1e-4 (prior logits SGD 1e-2),
  1e6 steps; DisARM, ARM and REINFORCE-LOO (2 samples) on linear one-layer (3
  seeds), DisARM and RLOO on Fashion-MNIST and on the nonlinear model (1 seed);
  the multi-sample bound: local DisARM with P pairs against VIMCO with 2P
  samples; and ``disarm_linear1_handwritten``: a hand-written jitted JAX DisARM
  step of the same setup (``benchmarks/disarm_reference_jax.py``, no plugin),
  the row's reference since the paper's figures are not in the reference file.
* ``cvae_*``: the ReinMax MNIST-VAE harness (160 epochs = 96,000 steps),
  ``examples/categorical_vae.py`` at each estimator's tuned configuration.
* ``gen_*``, ``sp_*``: REBAR's table (Tucker et al. 2017), ``--preset rebar``,
  2e6 steps: REBAR (adapted) and DisARM.

Drift check: each record has the training objective averaged over each tenth of
the run; a run whose last tenth is more than 2 nats below its best tenth is
marked in the table (an estimator that collapses as it trains).
"""

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Published figures (../shared/REFERENCE_RESULTS.md). REBAR Table App.1 (train ELBO)
# and App.2 (test 100-sample bound), column "REBAR".
REBAR_TABLE = {
    ("gen", "linear1"): ("-111.6 ± 0.03", "-107.65 ± 0.08"),
    ("gen", "linear2"): ("-98.8 ± 0.03", "-95.67 ± 0.04"),
    ("sp", "linear1"): ("-65.244 ± 0.009", "-65.61 ± 0.02"),
}
# ReinMax-CV author's released results (train / test -ELBO, mean (sd) over 10 seeds).
REINMAX_CV = {"8x4": ("124.94 (0.77)", "126.63 (0.71)"),
              "4x24": ("100.19 (0.41)", "102.45 (0.41)")}

DRIFT_NATS = 2.0
SEEDS3, SEED1 = (0, 1, 2), (0,)


class Config:
    """One row of the table: a named run of ``script`` with ``args``, per seed."""

    def __init__(self, name, setup, label, script, args, seeds, published=("-", "-")):
        self.name, self.setup, self.label = name, setup, label
        self.script, self.args, self.seeds, self.published = script, args, seeds, published


def configs(budget):
    """The configurations of ``budget`` ("full": the papers'; "small": 5,000 steps)."""
    full = budget == "full"
    out = []
    # DisARM paper: dynamic MNIST, --preset disarm
    steps = 1_000_000 if full else 5000
    ev = ["--eval-every", str(steps // 20), "--eval-size", "1000"]
    for est, seeds in (("disarm", SEEDS3), ("arm", SEEDS3), ("rloo", SEEDS3)):
        out.append(Config(f"disarm_linear1_{est}", "disarm_linear1", est, "examples/sbn.py",
                          ["--preset", "disarm", "--estimator", est, "--num-steps", str(steps)]
                          + ev, seeds))
    out.append(Config("disarm_linear1_handwritten", "disarm_linear1",
                      "hand-written JAX DisARM (reference)", "benchmarks/disarm_reference_jax.py",
                      ["--num-steps", str(steps)] + ev, SEED1))
    for est in ("disarm", "rloo"):
        out.append(Config(f"disarm_fashion_linear1_{est}", "disarm_fashion_linear1", est,
                          "examples/sbn.py", ["--preset", "disarm", "--dataset", "fashion_mnist",
                                              "--estimator", est, "--num-steps", str(steps)] + ev,
                          SEED1))
        out.append(Config(f"disarm_nonlinear_{est}", "disarm_nonlinear", est, "examples/sbn.py",
                          ["--preset", "disarm", "--model", "nonlinear", "--estimator", est,
                           "--num-steps", str(steps)] + ev, SEED1))
    for P in (1, 2):
        for est, label in (("local_disarm", f"local DisARM, {P} pair(s)"),
                           ("vimco", f"VIMCO, {2 * P} samples")):
            out.append(Config(f"disarm_iwae{2 * P}_{est}", f"disarm_iwae{2 * P}", label,
                              "examples/sbn.py",
                              ["--preset", "disarm", "--estimator", est, "--num-samples",
                               str(2 * P), "--num-steps", str(steps)] + ev, SEED1))
    # ReinMax harness
    steps = 96_000 if full else 3000
    ev = ["--eval-every", str(max(1000, steps // 20)), "--eval-size", "1000"]
    for size in ("8x4", "4x24"):
        for est, seeds in (("reinmax_cv", SEEDS3), ("reinmax_rao", SEEDS3), ("reinmax", SEEDS3),
                           ("st", SEED1), ("gumbel_st", SEED1)):
            pub = REINMAX_CV[size] if est == "reinmax_cv" else ("-", "-")
            out.append(Config(f"cvae_{size}_{est}", f"cvae_{size}", est,
                              "examples/categorical_vae.py",
                              ["--latent", size, "--estimator", est, "--num-steps", str(steps)]
                              + ev, seeds, pub))
        # the plugin with the authors' analytic KL (``--kl analytic``: masked sites + factor),
        # the authors' objective: 3 seeds, as the issue asks of their configuration
        out.append(Config(f"cvae_{size}_reinmax_cv_analytic", f"cvae_{size}",
                          "reinmax_cv, analytic KL", "examples/categorical_vae.py",
                          ["--latent", size, "--estimator", "reinmax_cv", "--kl", "analytic",
                           "--num-steps", str(steps)] + ev, SEEDS3, REINMAX_CV[size]))
        # hand-written JAX ReinMax-CV (authors' form) of the same setup, with our
        # one-sample KL and with the authors' analytic KL (benchmarks/cvae_reference_jax.py)
        for kl in ("analytic", "sample"):
            out.append(Config(f"cvae_{size}_handwritten_{kl}", f"cvae_{size}",
                              f"hand-written JAX ReinMax-CV, {kl} KL (reference)",
                              "benchmarks/cvae_reference_jax.py",
                              ["--latent", size, "--estimator", "reinmax_cv", "--kl", kl,
                               "--num-steps", str(steps)] + ev, SEED1))
        # the authors' training loop in PyTorch (benchmarks/cvae_reference_torch.py); 3 seeds
        # of ReinMax-CV at 8 x 4, where the plugin's gap to the released means is not the KL
        for est in ("reinmax_cv", "reinmax"):
            out.append(Config(f"cvae_{size}_torch_{est}", f"cvae_{size}",
                              f"PyTorch, the authors' loop: {est}, analytic KL (reference)",
                              "benchmarks/cvae_reference_torch.py",
                              ["--latent", size, "--estimator", est, "--num-steps", str(steps)]
                              + ev, SEEDS3 if (size, est) == ("8x4", "reinmax_cv") else SEED1,
                              REINMAX_CV[size] if est == "reinmax_cv" else ("-", "-")))
    # the other stored version of the authors' reinmax_jacobians.py (fe1ee7bc): ReinMax at the
    # model's temperature, the Gumbel-Rao / Gumbel-softmax terms at tau2 = 0.5 (8 x 4: tau = 1)
    out.append(Config("cvae_8x4_torch_reinmax_cv_tau2_0.5", "cvae_8x4",
                      "PyTorch, the authors' loop: reinmax_cv, tau2 = 0.5 (fe1ee7bc), analytic KL",
                      "benchmarks/cvae_reference_torch.py",
                      ["--latent", "8x4", "--estimator", "reinmax_cv", "--tau2", "0.5",
                       "--reinmax-temperature", "1.0", "--num-steps", str(steps)] + ev, SEED1,
                      REINMAX_CV["8x4"]))
    # REBAR table
    steps = 2_000_000 if full else 5000
    ev = ["--eval-every", str(steps // 20), "--eval-size", "1000"]
    for task, script, models in (("gen", "examples/sbn.py", ("linear1", "linear2")),
                                 ("sp", "examples/structured_prediction.py", ("linear1",))):
        for m in models:
            for est in ("rebar", "disarm"):
                out.append(Config(f"{task}_{m}_{est}", f"rebar_{task}_{m}", est, script,
                                  ["--preset", "rebar", "--model", m, "--estimator", est,
                                   "--num-steps", str(steps)] + ev, SEED1,
                                  REBAR_TABLE.get((task, m), ("-", "-"))))
        # REBAR's lr was the best of a grid (3e-5 ... 3e-3); the preset's is 3e-4. One run at
        # the next grid value, the one a 400k-step hand-written comparison found better.
        for m in models[:1]:
            out.append(Config(f"{task}_{m}_rebar_lr1e-3", f"rebar_{task}_{m}", "rebar, lr 1e-3",
                              script, ["--preset", "rebar", "--model", m, "--estimator", "rebar",
                                       "--lr", "1e-3", "--num-steps", str(steps)] + ev, SEED1,
                              REBAR_TABLE.get((task, m), ("-", "-"))))
    # hand-written jitted JAX REBAR of the gen. linear1 setup (benchmarks/rebar_reference_jax.py)
    out.append(Config("gen_linear1_handwritten", "rebar_gen_linear1",
                      "hand-written JAX REBAR (reference)", "benchmarks/rebar_reference_jax.py",
                      ["--num-steps", str(steps)] + ev, SEED1, REBAR_TABLE[("gen", "linear1")]))
    return out


SETUPS = {
    "disarm_linear1": "DisARM paper: dynamic MNIST, linear one-layer SBN, 1M steps, batch 50",
    "disarm_fashion_linear1": "DisARM paper: dynamic Fashion-MNIST, linear one-layer, 1M steps",
    "disarm_nonlinear": "DisARM paper: dynamic MNIST, nonlinear SBN, 1M steps",
    "disarm_iwae2": "DisARM paper, multi-sample bound (2 evaluations): local DisARM P=1 vs VIMCO K=2",
    "disarm_iwae4": "DisARM paper, multi-sample bound (4 evaluations): local DisARM P=2 vs VIMCO K=4",
    "cvae_8x4": "ReinMax harness, 8 x 4 categorical VAE, 160 epochs (test/train -ELBO)",
    "cvae_4x24": "ReinMax harness, 4 x 24 categorical VAE, 160 epochs (test/train -ELBO)",
    "rebar_gen_linear1": "REBAR table: generative, static MNIST, linear one-layer, 2M steps",
    "rebar_gen_linear2": "REBAR table: generative, static MNIST, linear two-layer, 2M steps",
    "rebar_sp_linear1": "REBAR table: structured prediction, linear one-layer, 2M steps",
}


def record_path(results, budget, name, seed):
    return results / budget / f"{name}_s{seed}.json"


def binned(history, bins=200):
    """(step, mean objective) over ``bins`` equal chunks of the run."""
    if not history:
        return []
    h = np.asarray(history, dtype=float)
    return [[float(c[-1, 0]), float(c[:, 1].mean())]
            for c in np.array_split(h, min(bins, len(h))) if len(c)]


def run_one(cfg, seed, budget, backend, results, out_root):
    """Run one configuration and seed; write and return its record."""
    out_dir = out_root / budget / backend / f"{cfg.name}_s{seed}"
    cmd = [sys.executable, str(ROOT / cfg.script), *cfg.args, "--seed", str(seed),
           "--backend", backend, "--no-progress", "--out", str(out_dir), "--overwrite", "--threads", "1"]
    if cfg.script.startswith("examples/"):  # resumable within the machine's lifetime (out/)
        steps = int(cfg.args[cfg.args.index("--num-steps") + 1])
        cmd += ["--checkpoint-every", str(max(1000, steps // 20)), "--resume"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    shown = " ".join(c.replace(str(ROOT) + "/", "") for c in cmd[1:])
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        err = {"name": cfg.name, "seed": seed, "error": " | ".join(tail), "cmd": shown,
               "date": time.strftime("%Y-%m-%d")}
        failed = results / budget / "failed" / f"{cfg.name}_s{seed}.json"
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(json.dumps(err) + "\n")  # shown in RESULTS.md until a run succeeds
        return err
    res = json.loads(p.stdout.strip().splitlines()[-1])
    rec = {"name": cfg.name, "seed": seed, "budget": budget, "wall_s": wall, "cmd": shown,
           "date": time.strftime("%Y-%m-%d"), **res}
    full_json = Path(res["plot"]).with_suffix(".json") if res.get("plot") else None
    if full_json and full_json.exists():
        d = json.loads(full_json.read_text())
        rec["curve"] = binned(d.get("history", []))
        rec["tests"] = d.get("tests", [])
    path = record_path(results, budget, cfg.name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec) + "\n")
    return rec


def load_records(results, budget):
    """The run records of ``budget``, and the failures of runs that have no record."""
    d = results / budget
    if not d.exists():
        return []
    recs = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
    done = {(r["name"], r["seed"]) for r in recs}
    fails = [json.loads(p.read_text()) for p in sorted((d / "failed").glob("*.json"))]
    return recs + [f for f in fails if (f["name"], f["seed"]) not in done]


def existing(results, budget, name, seed, backend):
    """Whether a record of this run exists; one of another backend is an error."""
    path = record_path(results, budget, name, seed)
    if not path.exists():
        return False
    have = json.loads(path.read_text()).get("backend")
    if have != backend and not str(have).startswith(("jax (", "torch (")):  # references: no backend
        raise SystemExit(f"{path} holds a {have} run; this table is {backend}'s. Move it or "
                         f"pass --results DIR for a {backend} table.")
    return True


def fmt(values, nd=2, sign=1.0):
    values = [sign * v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{nd}f}"
    return f"{statistics.mean(values):.{nd}f} ± {statistics.stdev(values):.{nd}f}"


def _test_key(rec):
    return next((k for k in rec if k.startswith("test_bound_") and not k.endswith("subset")),
                None)


def render(records, cfgs, budget, path, plot_dir):
    """RESULTS.md (table + notes) and one training-curve plot per setup."""
    kept = ""
    if path.exists() and HAND_WRITTEN in path.read_text():
        kept = path.read_text().split(HAND_WRITTEN, 1)[1]
    by_name = {}
    for r in records:
        if "error" not in r:
            by_name.setdefault(r["name"], []).append(r)
    lines = [
        "# Results", "",
        f"Rendered by `python benchmarks/reproduce.py --render-only` from the run records in "
        f"`results/{budget}/` (one JSON file per configuration and seed; the command that made "
        "each is in its `cmd` field). Mean ± sample sd over the seeds listed. Published figures "
        "are from `../shared/REFERENCE_RESULTS.md`: REBAR's table (± SEM over 5 trials; its "
        "column is REBAR's own figure: the table has no DisARM column) and ReinMax-CV's "
        "released per-seed results (mean (population sd) over 10 seeds). The DisARM paper's "
        "figures are not in the reference file: its rows are compared with a hand-written "
        "jitted JAX DisARM step of the same setup (`benchmarks/disarm_reference_jax.py`).",
        "",
        "Columns. *train*: the training objective (minibatch ELBO, or the K-sample bound for "
        "VIMCO / local DisARM) averaged over the last tenth of the steps (ReinMax harness: over "
        "the last epoch, as the released results); *best tenth*: the same "
        "average over the best tenth of the run; a **drift** mark when the last tenth is more "
        f"than {DRIFT_NATS:g} nats below the best. *test*: the 100-sample bound on the full "
        "test set at the end (ReinMax harness: the test ELBO, shown as -ELBO as the papers do; "
        "its 100-sample bound is in the notes).", "",
    ]
    notes, setups, sections = [], [], []
    header = ["estimator", "seeds", "steps", "train", "best tenth", "test",
              "published train / test", "ms/step", "drift"]
    for setup, title in SETUPS.items():
        rows = [c for c in cfgs if c.setup == setup and c.name in by_name]
        if not rows:
            continue
        setups.append(setup)
        cvae = setup.startswith("cvae")
        sign = -1.0 if cvae else 1.0
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        table = []
        for c in rows:
            rs = sorted(by_name[c.name], key=lambda r: r["seed"])
            train = [(r.get("train_objective_last_epoch") if cvae else None)
                     or r["train_objective_last_tenth"] for r in rs]  # cvae: as released
            best = [r["train_objective_best_tenth"] for r in rs]
            if cvae:
                test = [r.get("test_elbo") for r in rs]
                b = [r.get(_test_key(r)) for r in rs]
                if any(v is not None for v in b):  # the PyTorch reference reports none
                    notes.append(f"- `{c.name}`: test 100-sample bound {fmt(b)}")
            else:
                test = [r.get(_test_key(r)) for r in rs]
            drift = [r["seed"] for r in rs
                     if (r.get("train_objective_drift") or 0.0) > DRIFT_NATS]
            ms = statistics.mean(r["ms_per_step"] for r in rs)
            pub = " / ".join(c.published) if c.published != ("-", "-") else "-"
            row = [c.label, ",".join(str(r["seed"]) for r in rs), f"{rs[0]['steps']:,}",
                   fmt(train, sign=sign), fmt(best, sign=sign), fmt(test, sign=sign), pub,
                   f"{ms:.2f}", f"**drift** (seeds {','.join(map(str, drift))})" if drift else ""]
            table.append(row)
            lines.append("| " + " | ".join(row) + " |")
        sections.append((setup, title, table))
        lines += ["", f"![{setup}](docs/results/{budget}_{setup}.png)", ""]
        _plot(setup, title, [(c.label, by_name[c.name]) for c in rows],
              plot_dir / f"{budget}_{setup}.png", sign)
    missing = [f"`{c.name}` (seeds {','.join(str(s) for s in c.seeds if not any(r['seed'] == s for r in by_name.get(c.name, [])))})"
               for c in cfgs if len(by_name.get(c.name, [])) < len(c.seeds)]
    errors = [f"- `{r['name']}` seed {r['seed']}: {r['error']}" for r in records if "error" in r]
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    if errors:
        lines += ["Failed runs:", ""] + errors + [""]
    if missing:
        lines += ["Not run yet (`python benchmarks/reproduce.py` runs them, skipping what "
                  "exists): " + ", ".join(missing) + ".", ""]
    lines += [HAND_WRITTEN]
    path.write_text("\n".join(lines) + (kept or "\n"))
    explained = kept.split(SMALL_BUDGET, 1)[0].strip()  # the hand-written full-budget notes
    _render_rst(sections, header, budget, plot_dir.parent / "results.rst", missing, explained)
    return setups


def _md_to_rst(text):
    """The subset of Markdown the hand-written notes use: headings, bullets, code, links,
    tables and images under ``docs/``."""
    out, table = [], []
    for line in text.splitlines() + [""]:
        m = re.fullmatch(r"!\[[^\]]*\]\(docs/([^)]+)\)", line.strip())
        if m:  # an image of the docs' tree, as the generated sections show theirs
            out += [f".. image:: {m.group(1)}", "   :width: 90%"]
            continue
        line = re.sub(r"(?<!`)`([^`]+)`(?!`)", r"``\1``", line)  # code, then links
        line = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"`\1 <\2>`_", line)
        if line.startswith("|"):  # a table row; the |---| row is dropped
            if not re.fullmatch(r"\|[-|: ]+\|", line):
                table.append([c.strip() or "-" for c in line.strip("|").split("|")])
            continue
        if table:
            out += [".. list-table::", "   :header-rows: 1", ""]
            for row in table:
                out += ["   * - " + row[0]] + [f"     - {c}" for c in row[1:]]
            out, table = out + [""], []
        m = re.match(r"(#+) (.*)", line)
        if m:
            title = m.group(2)
            out += [title, ("-" if len(m.group(1)) == 2 else "~") * len(title)]
        else:
            out.append(line)
    return "\n".join(out).rstrip() + "\n"


def _render_rst(sections, header, budget, path, missing, explained=""):
    """The docs' results page: the same tables and plots as RESULTS.md."""
    out = ["Results", "=======", "",
           "Published numbers reproduced at the papers' full budgets with the NumPyro backend "
           "of the examples (``benchmarks/reproduce.py``; one run record per configuration and "
           f"seed under ``results/{budget}/``). Mean ± sample sd over seeds. *train*: the "
           "training objective averaged over the last tenth of the steps (ReinMax harness: "
           "the last epoch, as the released results); *best tenth*: over "
           "the best tenth (a drift mark when the last is more than "
           f"{DRIFT_NATS:g} nats below the best); *test*: the 100-sample bound on the full "
           "test set (ReinMax harness: test -ELBO). Published figures: REBAR's Tables App.1 "
           "and App.2 (Tucker et al. 2017, column REBAR), ReinMax-CV's released per-seed "
           "results (Wang & Bui); the DisARM paper's rows are compared with a hand-written "
           "jitted JAX DisARM step of the same setup.", ""]
    for setup, title, table in sections:
        out += [title, "-" * len(title), "", ".. list-table::", "   :header-rows: 1", ""]
        for row in [header] + table:
            cells = [(c.replace("**", "") or "-") for c in row]
            out += ["   * - " + cells[0]] + [f"     - {c}" for c in cells[1:]]
        out += ["", f".. image:: results/{budget}_{setup}.png", "   :width: 90%", ""]
    if missing:
        out += ["Not run yet: " + ", ".join(m.replace("`", "``") for m in missing) + ".", ""]
    if explained:  # RESULTS.md's hand-written notes on the full-budget rows, one source
        out += [_md_to_rst(explained), ""]
    path.write_text("\n".join(out))


def _plot(setup, title, series, png, sign):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, rs) in enumerate(series):
        for j, r in enumerate(sorted(rs, key=lambda r: r["seed"])):
            if r.get("curve"):
                cv = np.asarray(r["curve"])
                ax.plot(cv[:, 0], sign * cv[:, 1], color=f"C{i}", lw=1, alpha=0.9,
                        label=f"{label} (train)" if j == 0 else None)
            if r.get("tests"):
                ts = np.asarray(r["tests"], dtype=float)
                ax.plot(ts[:, 0], sign * ts[:, 1], "o", ms=2.5, color=f"C{i}", alpha=0.7,
                        label=f"{label} (test 100-sample bound, subset)" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("-ELBO (nats)" if sign < 0 else "nats per example")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if sign > 0 else "upper right")
    vals = [sign * p[1] for _, rs in series for r in rs
            for p in r.get("curve", [])[len(r.get("curve", [])) // 10:]]
    vals += [sign * t[1] for _, rs in series for r in rs
             for t in r.get("tests", [])[len(r.get("tests", [])) // 10 + 1:]]
    if vals:
        lo, hi = np.percentile(vals, 1), np.percentile(vals, 99)
        pad = 0.15 * (hi - lo) + 1
        ax.set_ylim(lo - pad, hi + pad)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


#: RESULTS.md keeps everything below this line when re-rendered (hand-written sections)
HAND_WRITTEN = "<!-- Sections below are written by hand; reproduce.py keeps them. -->"
SMALL_BUDGET = "## Earlier small-budget runs"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=("full", "small"), default="full")
    p.add_argument("--only", nargs="*", default=None, help="configuration names (prefixes)")
    p.add_argument("--seeds", nargs="*", type=int, default=None,
                   help="override the configurations' seeds")
    p.add_argument("--backend", choices=("pyro", "numpyro"), default="numpyro")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "reproduce")
    p.add_argument("--results-md", type=Path, default=ROOT / "RESULTS.md")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--list", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    args = p.parse_args(argv)
    cfgs = configs(args.budget)
    if args.only:
        names = {c.name for c in cfgs}  # an exact name selects itself only, else a prefix
        cfgs = [c for c in cfgs
                if any(c.name == o if o in names else c.name.startswith(o) for o in args.only)]
    if args.list:
        for c in cfgs:
            print(c.name, "seeds", c.seeds, c.script, " ".join(c.args))
        return
    all_cfgs = configs(args.budget)
    if not args.render_only:
        todo = [(c, s) for c in cfgs for s in (args.seeds or c.seeds)
                if not existing(args.results, args.budget, c.name, s, args.backend)]
        todo.sort(key=lambda job: job[1])  # every row at its first seed before more seeds
        lock = threading.Lock()

        def one(job):
            cfg, seed = job
            r = run_one(cfg, seed, args.budget, args.backend, args.results, args.out)
            with lock:
                if "error" in r:
                    print(f"{cfg.name} seed {seed}: FAILED {r['error']}", flush=True)
                else:
                    print(f"{cfg.name} seed {seed}: train {r['train_objective_last_tenth']:.2f} "
                          f"test {r.get(_test_key(r))} {r['ms_per_step']:.2f} ms/step "
                          f"wall {r['wall_s']:.0f}s", flush=True)

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, todo))
    render(load_records(args.results, args.budget), all_cfgs, args.budget, args.results_md,
           args.plots)
    print(f"wrote {args.results_md}")


if __name__ == "__main__":
    main()
