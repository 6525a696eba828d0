"""
Run named configurations of the examples (task, model, estimator, seeds, steps)
one after another and write ``RESULTS.md``: one row per (task, model, estimator)
with our figure (mean ± sd over seeds), the published figure from
``../shared/REFERENCE_RESULTS.md``, the step budget and the wall time.

    python benchmarks/reproduce.py                 # the small budget (about 20-40 min on 2 cores)
    python benchmarks/reproduce.py --full          # the papers' budgets (days on a CPU)
    python benchmarks/reproduce.py --only gen_linear1 --seeds 0 1 2
    python benchmarks/reproduce.py --render-only   # re-write RESULTS.md from saved runs

Each run is a subprocess (``examples/*.py --no-progress``); its JSON line is
appended to ``out/reproduce/<budget>/runs.jsonl``, so an interrupted session can
continue (runs already there are skipped) and ``--render-only`` rebuilds the file.
"""

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Published figures (../shared/REFERENCE_RESULTS.md). REBAR Table App.1 (train ELBO)
# and App.2 (test 100-sample bound), column "REBAR" (the table has no DisARM / ARM /
# RLOO column: it is the reference these estimators are compared with).
REBAR_TABLE = {
    ("gen", "linear1"): ("-111.6 ± 0.03", "-107.65 ± 0.08"),
    ("gen", "linear2"): ("-98.8 ± 0.03", "-95.67 ± 0.04"),
    ("gen", "nonlinear"): ("-101.1 ± 0.1", "-100.69 ± 0.08"),
    ("sp", "linear1"): ("-65.244 ± 0.009", "-65.61 ± 0.02"),
    ("sp", "linear2"): ("-61.74 ± 0.02", "-61.68 ± 0.05"),
    ("sp", "nonlinear"): ("-46.44 ± 0.03", "-61.34 ± 0.02"),
}
# ReinMax-CV author's released results (train / test -ELBO, mean (sd) over 10 seeds).
REINMAX_CV = {"8x4": ("-124.94 (0.77)", "-126.63 (0.71)"),
              "4x24": ("-100.19 (0.41)", "-102.45 (0.41)")}

SMALL = dict(gen_steps=5000, sp_steps=5000, cvae_steps=3000, seeds=(0, 1, 2))
FULL = dict(gen_steps=2_000_000, sp_steps=2_000_000, cvae_steps=96_000, seeds=(0, 1, 2))


def configs(full):
    """The named configurations: (name, task, model, estimator, script, extra args)."""
    b = FULL if full else SMALL
    out = []
    gen_models = ("linear1", "linear2")
    gen_est = ("rebar", "disarm", "arm", "rloo")
    for m in gen_models:
        for e in gen_est:
            out.append((f"gen_{m}_{e}", "gen", m, e, "examples/sbn.py",
                        ["--preset", "rebar", "--model", m, "--estimator", e,
                         "--num-steps", str(b["gen_steps"]),
                         "--eval-every", str(max(1000, b["gen_steps"] // 20)),
                         "--eval-size", "500"]))
    for e in ("rebar", "disarm", "arm"):
        out.append((f"sp_linear1_{e}", "sp", "linear1", e, "examples/structured_prediction.py",
                    ["--preset", "rebar", "--model", "linear1", "--estimator", e,
                     "--num-steps", str(b["sp_steps"]),
                     "--eval-every", str(max(1000, b["sp_steps"] // 20)), "--eval-size", "500"]))
    sizes = ("8x4", "4x24")
    cvae_est = ("st", "gumbel_st", "reinmax", "reinmax_rao", "reinmax_cv")
    for s in sizes:
        for e in cvae_est:
            out.append((f"cvae_{s}_{e}", "cvae", s, e, "examples/categorical_vae.py",
                        ["--latent", s, "--estimator", e, "--num-steps", str(b["cvae_steps"]),
                         "--eval-every", str(max(1000, b["cvae_steps"] // 20)),
                         "--eval-size", "500"]))
    return out, b


def run_one(name, script, extra, seed, out_dir, backend):
    cmd = [sys.executable, str(ROOT / script), *extra, "--seed", str(seed), "--backend", backend,
           "--no-progress", "--out", str(out_dir / name), "--tag", f"_s{seed}"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"name": name, "seed": seed, "error": " | ".join(tail), "wall_s": wall,
                "cmd": " ".join(cmd[1:])}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(name=name, seed=seed, wall_s=wall, cmd=" ".join(cmd[1:]))
    return res


def fmt(values, nd=2):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{nd}f}"
    return f"{statistics.mean(values):.{nd}f} ± {statistics.stdev(values):.{nd}f}"


TASK_NAME = {"gen": "MNIST gen. (static binarized)", "sp": "MNIST struct. pred. (static)",
             "cvae": "ReinMax MNIST-VAE"}


#: RESULTS.md keeps everything below this line when re-rendered (hand-written sections)
HAND_WRITTEN = "<!-- Sections below are written by hand; reproduce.py keeps them. -->"


def render(runs, cfgs, budget, full, path, backend):
    kept = ""
    if path.exists() and HAND_WRITTEN in path.read_text():
        kept = path.read_text().split(HAND_WRITTEN, 1)[1]
    lines = [
        "# Results",
        "",
        f"Generated by `python benchmarks/reproduce.py{' --full' if full else ''}` "
        f"(backend `{backend}`, {time.strftime('%Y-%m-%d')}). Mean ± sample sd over the "
        "seeds listed; published figures are copied from `../shared/REFERENCE_RESULTS.md` "
        "(their ± is the paper's own spread: SEM over 5 trials for REBAR, sd over 10 "
        "seeds for ReinMax-CV).",
        "",
    ]
    if not full:
        lines += [
            "**These are not reproductions.** The papers train for 2,000,000 steps (REBAR "
            "tables) or 160 epochs = 96,000 steps (ReinMax harness); the rows below ran "
            f"{budget['gen_steps']:,} / {budget['sp_steps']:,} / {budget['cvae_steps']:,} "
            "steps on a shared 2-core CPU (one thread), i.e. 0.25 % of the REBAR budget and "
            "3 % of the ReinMax one, with "
            f"{len(budget['seeds'])} seeds. Figures this early in training are tens of nats "
            "below the published ones and say nothing about the estimators' final quality; "
            "they check that the pipeline (models, presets, estimators, evaluation) runs "
            "end to end and give per-step costs. `python benchmarks/reproduce.py --full` "
            "runs the papers' budgets (3 seeds, all required rows) on a machine that has "
            "the time.",
            "",
        ]
    lines += [
        "| task | model | estimator | seeds | steps (paper) | train ELBO, ours | "
        "train ELBO, published | test 100-sample bound, ours | test bound / -ELBO, published "
        "| ms/step | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, task, model, est, _script, _extra in cfgs:
        rs = [r for r in runs if r.get("name") == name and "error" not in r]
        errs = [r for r in runs if r.get("name") == name and "error" in r]
        if errs and not rs:
            notes.append(f"- `{name}`: not run: {errs[0]['error']}")
            continue
        if not rs:
            continue
        train = [r["train_objective_last10pct"] for r in rs]
        test = [r["test_bound_100"] for r in rs if r.get("test_bound_100") is not None]
        steps = rs[0]["steps"]
        if task in ("gen", "sp"):
            pub_train, pub_test = REBAR_TABLE.get((task, model), ("-", "-"))
            pub_train = f"{pub_train} (REBAR)"
            pub_test = f"{pub_test} (REBAR)"
            paper_steps = "2,000,000"
        else:
            cv = REINMAX_CV.get(model)
            pub_train = f"{cv[0]} (ReinMax-CV, -ELBO)" if cv and est == "reinmax_cv" else "not in reference file"
            pub_test = f"{cv[1]} (ReinMax-CV, test -ELBO)" if cv and est == "reinmax_cv" else "-"
            paper_steps = "96,000"
            test_elbo = [r["test_elbo"] for r in rs]
            test = test  # the 100-sample bound; the test ELBO is noted below
            notes.append(f"- `{name}`: test ELBO (1 sample, full test set) {fmt(test_elbo)}")
        ms = statistics.mean(r["ms_per_step"] for r in rs)
        wall = statistics.mean(r["wall_s"] for r in rs)
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| {TASK_NAME[task]} | {model} | {est} | {seeds} | {steps:,} ({paper_steps}) | "
            f"{fmt(train)} | {pub_train} | {fmt(test)} | {pub_test} | {ms:.1f} | {wall:.0f} |"
        )
    lines += [
        "",
        "Definitions. *train ELBO, ours*: mean of the minibatch training objective over the "
        "last 10 % of the steps (nats per example; a moving target early in training, so "
        "it lags the model's current ELBO). *test 100-sample bound*: "
        "`log 1/100 sum_k p(x, z_k) / q(z_k | x)` averaged over the whole test set "
        "(10,000 images; structured prediction: `log 1/100 sum_k p(x_low | z_k)`, "
        "`z_k ~ p(z | x_up)`). Setups: `--preset rebar` of `examples/sbn.py` / "
        "`examples/structured_prediction.py` (binarized_mnist.npz, train = its 50,000 "
        "training rows, batch 24, Adam lr 3e-4 and beta2 = 0.99999, {-1, 1} variables, "
        "centred encoder input, output bias at the data logit); REBAR's lr was the best of a "
        "grid, ours is one grid value; REBAR's unbiased baselines used input-dependent "
        "baselines, ours (DisARM, ARM, RLOO with 2 samples) use none. "
        "`examples/categorical_vae.py` uses the tuned (lr, temperature, optimizer) of the "
        "reference file for each estimator; our KL term is a one-sample estimate (the "
        "papers' is analytic; equal in expectation).",
        "",
    ]
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    if not full:
        lines += ["Observations (small budget, written by hand after the run; re-check "
                  "them when re-running):", ""] + OBSERVATIONS_SMALL + [""]
    cmds = sorted({r["cmd"].replace(str(ROOT) + "/", "") for r in runs if "cmd" in r})
    lines += ["Commands (one per run):", "", "```"] + [f"python {c}" for c in cmds] + ["```", ""]
    lines += [HAND_WRITTEN]
    path.write_text("\n".join(lines) + (kept or "\n"))


OBSERVATIONS_SMALL = [
    "- Generative linear-1: after 5,000 of 2,000,000 steps the models are 35 nats (train) "
    "/ 27 nats (test bound) below REBAR's final figures: they are at the start of a long "
    "learning curve (the test bound was still rising by about 3 nats per 1,000 steps at the "
    "end, see the plots in `out/reproduce/`). The ordering DisARM > ARM > RLOO (2 samples) "
    "at equal cost is the papers' ordering; the gaps (0.6 and 2.3 nats on the test bound) "
    "exceed the spread over 2 seeds (< 0.1 nats), but at this budget they measure "
    "early-training speed, not final quality.",
    "- Structured prediction linear-1: -82.4 vs REBAR's -65.6 on the test bound, for the "
    "same reason; DisARM ahead of ARM by 0.1-0.3 nats.",
    "- Our REBAR (temperature and eta per site adapted on the variance gradient at 10x the "
    "lr, no input-dependent baseline) is ahead of DisARM at equal steps: +1.1 nats on the "
    "generative test bound (-133.21 vs -134.27) and +2.0 on structured prediction (-80.35 "
    "vs -82.35), at 3.2x / 2.0x DisARM's cost per step (27.1 vs 8.5 ms; 14.1 vs 6.9 ms: "
    "1 + 2T evaluations plus the double backward pass of the variance gradient). At equal "
    "wall time DisARM would run 2-3x the steps; at this budget that favours DisARM.",
    "- Why no figure here can be compared with the papers': the budget (above); REBAR's "
    "lr was picked per estimator from a 5-value grid, ours is one value (3e-4); the "
    "unbiased estimators of the REBAR table had input-dependent baselines (NVIL/MuProp) or "
    "learned control-variate scales, DisARM/ARM/RLOO here have none (by design); REBAR's "
    "table has no DisARM/ARM/RLOO column, so the published column is REBAR's own figure.",
    "- ReinMax harness 8x4: 3,000 steps = 5 of 160 epochs; the reference file gives no "
    "ST/ReinMax figures (only their tuned hyperparameters), so only ReinMax-CV's released "
    "results (test -ELBO 126.63 at 160 epochs) can be compared, in the --full run. At 5 "
    "epochs ReinMax and ST have the same test ELBO (-143.5) and ReinMax the better "
    "training objective (0.9 nats), but ST the better 100-sample bound (by 4 nats): "
    "ST's encoder is sharper/less calibrated early on, which the multi-sample bound "
    "rewards; not a conclusion about 160 epochs.",
    "- Gradient variance (`docs/results/gradient_variance_sbn_linear1.png`, "
    "`python examples/gradient_variance.py --num-steps 3000 --every 300 "
    "--out-png docs/results/gradient_variance_sbn_linear1.png`; linear SBN, dynamic MNIST, "
    "batch 50, lr 1e-3, one DisARM trajectory, all estimators at the same parameters, 100 "
    "draws per point; REBAR's temperature and eta adapted along the trajectory by their own "
    "variance-gradient steps): log10 of the mean per-parameter encoder-gradient variance "
    "at step 3000 is REBAR -2.46, DisARM -1.92, ARM -1.78, RLOO (2 samples) -1.70, "
    "TraceGraph_ELBO +0.84. REBAR's variance is 3.5x below DisARM's at step 3000 (2.2x at "
    "step 0) at 3.1x the cost per draw (26 vs 8.4 ms); per unit of compute the two are "
    "close, as in the DisARM paper's comparison.",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the papers' step budgets, 3 seeds")
    p.add_argument("--only", nargs="*", default=None, help="configuration names (prefixes)")
    p.add_argument("--seeds", nargs="*", type=int, default=None)
    p.add_argument("--backend", choices=("pyro", "numpyro"), default="pyro")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "reproduce")
    p.add_argument("--results", type=Path, default=ROOT / "RESULTS.md")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--list", action="store_true")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (each a one-thread subprocess; default 1)")
    args = p.parse_args(argv)
    cfgs, budget = configs(args.full)
    if args.seeds:
        budget = dict(budget, seeds=tuple(args.seeds))
    if args.only:
        cfgs = [c for c in cfgs if any(c[0].startswith(o) for o in args.only)]
    if args.list:
        for c in cfgs:
            print(c[0], " ".join(c[5]))
        return
    out_dir = args.out / ("full" if args.full else "small") / args.backend
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "runs.jsonl"
    runs = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    if not args.render_only:
        todo = [(name, script, extra, seed) for name, task, model, est, script, extra in cfgs
                for seed in budget["seeds"]
                if not any(r.get("name") == name and r.get("seed") == seed and "error" not in r
                           for r in runs)]
        todo.sort(key=lambda job: job[3])  # every row at its first seeds before more seeds
        lock = threading.Lock()

        def one(job):
            name, script, extra, seed = job
            r = run_one(name, script, extra, seed, out_dir, args.backend)
            with lock:
                runs.append(r)
                with open(log, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
                msg = r.get("error") or (f"train {r['train_objective_last10pct']:.2f} "
                                         f"test100 {r['test_bound_100']:.2f} "
                                         f"{r['ms_per_step']:.1f} ms/step wall {r['wall_s']:.0f}s")
                print(f"{name} seed {seed}: {msg}", flush=True)
                render(runs, cfgs, budget, args.full, args.results, args.backend)

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, todo))
    render(runs, cfgs, budget, args.full, args.results, args.backend)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
