"""
The plot of RESULTS.md's "Why the REBAR-table rows miss": the REBAR-table generative
linear one-layer REBAR row (``results/full/gen_linear1_rebar_s0.json``, the plugin)
beside the hand-written jitted JAX REBAR reference runs of ``results/explain/``
(``benchmarks/rebar_reference_jax.py``: the plugin's setup at lr 3e-4, seed 0 and
seeds 1 and 2 where their records exist, and at lr 1e-3; the authors' released setup) and the
plugin's seeds 1-3 to 400,000 steps where their records exist, the
first 400,000 steps: the minibatch training ELBO in 10,000-step bins and the test
100-sample bound on a 1,000-image subset.

    python benchmarks/plot_explain.py          # docs/results/explain_rebar_gen_linear1.png
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [  # (record, label); a record that is not there is left out
    ("results/full/gen_linear1_rebar_s0.json", "plugin REBAR_ELBO, lr 3e-4"),
    ("results/explain/rebar_gen_linear1_plugin_400k_s1.json", "plugin, lr 3e-4, seed 1"),
    ("results/explain/rebar_gen_linear1_plugin_400k_s2.json", "plugin, lr 3e-4, seed 2"),
    ("results/explain/rebar_gen_linear1_plugin_400k_s3.json", "plugin, lr 3e-4, seed 3"),
    ("results/explain/rebar_gen_linear1_plain_400k_s0.json", "hand-written, lr 3e-4"),
    ("results/explain/rebar_gen_linear1_plain_400k_s1.json", "hand-written, lr 3e-4, seed 1"),
    ("results/explain/rebar_gen_linear1_plain_400k_s2.json", "hand-written, lr 3e-4, seed 2"),
    ("results/explain/rebar_gen_linear1_plain_400k_lr1e-3_s0.json", "hand-written, lr 1e-3"),
    ("results/explain/rebar_gen_linear1_authors_s0.json", "hand-written, authors' setup"),
]
STEPS = 400_000


def main(out=ROOT / "docs" / "results" / "explain_rebar_gen_linear1.png"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for path, label in RUNS:
        if not (ROOT / path).exists():
            continue
        rec = json.loads((ROOT / path).read_text())
        curve = [(s, v) for s, v in rec["curve"] if s <= STEPS and s > 20_000]
        line, = ax.plot(*zip(*curve), label=label, lw=1.2)
        tests = [(s, v) for s, v in rec.get("tests", []) if 0 < s <= STEPS]
        bx.plot(*zip(*tests), "o-", color=line.get_color(), label=label)
    for a, what in ((ax, "train ELBO (10k-step bins)"), (bx, "test 100-sample bound (1,000 images)")):
        a.set_xlabel("step")
        a.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        a.set_ylabel(what)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("REBAR table, generative linear one-layer: plugin vs hand-written REBAR")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
