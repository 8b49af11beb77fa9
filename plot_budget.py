"""
Where width pays, and how close MoSE's widths come, as the training budget grows: a table and a figure from
finished train.py runs of one model shape at several training budgets.

    python plot_budget.py RUN_DIR [RUN_DIR ...] [--split=holdout] [--plot=budget.png]

Each run is read from its out_dir: ckpt.pt's config (the budget, max_train_flops; expert_hidden; width_sampling)
and the last evaluation in log.jsonl. A run with width_sampling 'none' is a plain MoE: the widest is "the MoE",
a narrower one (expert_hidden h) the model trained for width h / H. Any other run is MoSE, scored at each of its
eval widths. Runs that differ only in seed are averaged; the spread printed beside is max - min over seeds.

Two gaps per budget and width, in nats per token of the split (default: the held-out training authors, where
recipes are chosen), all at equal training FLOPs:
    width pays   dedicated(w) - MoE      > 0 where the full MoE beats the model trained for width w alone
    MoSE gap     MoSE(w) - dedicated(w)  how far the one slimmable model is from the model trained for w
"""

import json
import os
import sys
from collections import defaultdict
from statistics import mean


# config keys that do not change what a run learns: runs alike in everything else are seeds of one recipe
# (holdout_authors is recorded as the holdout_tokens it held out; a key that only one of two runs has came in
# with a later commit, whose default kept the earlier behaviour, and is not compared)
NOT_THE_RECIPE = {"seed", "out_dir", "data_dir", "init_from", "log_interval", "eval_interval", "eval_iters",
                  "eval_widths", "eval_k", "always_save_checkpoint", "compile", "device", "dtype", "wandb_log",
                  "wandb_project", "wandb_run_name", "holdout_authors"}


def read_run(out_dir, split):
    """(budget, kind, H, {width: loss}, recipe) of one finished run; kind is 'moe' or 'mose'. ValueError (one line) when
    the directory is not a train.py run, was not evaluated on the split, or has not spent its budget (a run still
    going has evaluations in log.jsonl too)."""
    import torch
    from model import GPTConfig
    try:
        ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
        config, hidden = ckpt["config"], GPTConfig(**ckpt["model_args"]).expert_hidden
        rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    except Exception as e:
        raise ValueError(f"{out_dir} is not a train.py run with ckpt.pt and log.jsonl ({type(e).__name__})") from None
    last = [r for r in rows if f"{split}/w=1" in r]
    if not last or not config.get("max_train_flops"):
        raise ValueError(f"{out_dir} has no {split} evaluation or no max_train_flops: train it with "
                         f"--max_train_flops=... (and --holdout_authors=... for --split=holdout)")
    if last[-1]["train_flops"] < config["max_train_flops"] * (1 - 1e-9):
        raise ValueError(f"{out_dir} stopped at {last[-1]['train_flops']:.3g} of its {config['max_train_flops']:g} "
                         f"FLOPs: finish it (the same command with --init_from=resume) or leave it out")
    losses = {float(k.split("w=")[1]): v for k, v in last[-1].items()
              if k.startswith(f"{split}/w=") and ",k=" not in k}
    kind = "moe" if config.get("width_sampling", "none") == "none" else "mose"
    recipe = {k: v for k, v in config.items() if k not in NOT_THE_RECIPE}
    return float(config["max_train_flops"]), kind, hidden, losses, (str(out_dir), recipe)


def gaps(runs):
    """From read_run's tuples: {budget: {width: row}}, each row holding the means and seed spreads of the MoE,
    the dedicated model, MoSE (where run) and the two gaps. The full width H is the widest expert in a budget."""
    out = {}
    for budget in sorted({r[0] for r in runs}):
        here = [r for r in runs if r[0] == budget]
        H = max(r[2] for r in here)
        seeds, recipes = defaultdict(list), {}   # (kind, width) -> the losses of every seed; its first recipe
        for _, kind, hidden, losses, (out_dir, recipe) in here:
            first, recipe_of = recipes.setdefault((kind, hidden), (out_dir, recipe))
            differ = sorted(k for k in recipe.keys() & recipe_of.keys() if recipe[k] != recipe_of[k])
            if differ:
                raise ValueError(f"{out_dir} and {first} differ in {', '.join(differ)}, not only in seed: "
                                 f"give one of them")
            if kind == "moe":
                seeds["dedicated", hidden / H].append(losses[1.0])
            else:
                for w, loss in losses.items():
                    seeds["mose", w * hidden / H].append(loss)
        stat = {key: (mean(v), max(v) - min(v), len(v)) for key, v in seeds.items()}
        widths = sorted({w for kind, w in stat if kind == "dedicated" and w < 1} |
                        {w for kind, w in stat if kind == "mose"}, reverse=True)
        rows = {}
        for w in widths:
            moe, ded, mose = stat.get(("dedicated", 1.0)), stat.get(("dedicated", w)), stat.get(("mose", w))
            rows[w] = {"moe": moe, "dedicated": ded, "mose": mose,
                       "width_pays": ded[0] - moe[0] if ded and moe and w < 1 else None,
                       "mose_gap": mose[0] - ded[0] if mose and ded else None}
        out[budget] = rows
    return out


def show(table, split):
    cell = lambda s: "" if s is None else f"{s[0]:.4f}" + (f" ±{s[1] / 2:.4f} ({s[2]})" if s[2] > 1 else " (1)")
    gap = lambda g: "" if g is None else f"{g:+.4f}"
    print(f"{split} loss, mean ±half the seed spread (seeds); gaps in nats per token at equal training FLOPs")
    print(f"{'budget':>8} {'width':>5} {'MoE':>22} {'dedicated(w)':>22} {'MoSE(w)':>22} {'ded-MoE':>8} {'MoSE-ded':>8}")
    for budget, rows in table.items():
        for w, r in rows.items():
            print(f"{budget:8.2e} {w:5.3g} {cell(r['moe']):>22} {cell(r['dedicated']):>22} {cell(r['mose']):>22} "
                  f"{gap(r['width_pays']):>8} {gap(r['mose_gap']):>8}")


def draw(table, path, split):
    """Left: dedicated(w) - MoE against the budget (above zero, the full MoE is worth its FLOPs); right: MoSE(w) -
    dedicated(w) (zero: the slimmable model's width is as good as a model trained for it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    widths = sorted({w for rows in table.values() for w in rows}, reverse=True)
    for ax, key, title in ((axes[0], "width_pays", "dedicated(w) - full MoE: > 0 where the full width pays"),
                           (axes[1], "mose_gap", "MoSE(w) - dedicated(w): how close each width comes")):
        for n, w in enumerate(widths):
            points = [(b, rows[w][key]) for b, rows in table.items() if w in rows and rows[w][key] is not None]
            if points:
                ax.plot(*zip(*points), "-o", color=f"C{n}", label=f"w = {w:g}")
        ax.axhline(0, color="gray", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel(f"{split} loss difference (nats per token)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    dirs = [a for a in sys.argv[1:] if not a.startswith("--")]
    opts = dict(a[2:].split("=", 1) for a in flags if "=" in a)
    bad = [a for a in flags if "=" not in a or a[2:].split("=")[0] not in ("split", "plot")]
    if bad or not dirs or opts.get("split", "holdout") not in ("holdout", "val"):
        sys.exit(f"plot_budget.py: usage: python plot_budget.py RUN_DIR [RUN_DIR ...] [--split=holdout|val] "
                 f"[--plot=PNG]" + (f" ({bad[0]} is not one of these)" if bad else ""))
    split, plot = opts.get("split", "holdout"), opts.get("plot", "")
    if plot:
        try:
            import matplotlib  # noqa: F401  (fail before reading any run)
        except ImportError:
            sys.exit("plot_budget.py: --plot needs matplotlib: pip install matplotlib")
    try:
        table = gaps([read_run(d, split) for d in dirs])
    except ValueError as e:
        sys.exit(f"plot_budget.py: {e}")
    show(table, split)
    if plot:
        draw(table, plot, split)
        print(f"wrote {plot}")
