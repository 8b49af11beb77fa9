"""
Draw the accuracy-compute curve from bench_flops.py's rows: validation loss against the share of the full-width
expert FLOPs (the main model's, at its training k), one line per dial of each swept model, the models trained for
one size (bench_flops --series) as marked points, a dense model as a horizontal line.

    python bench_flops.py ... --json=rows.json --plot=curve.png     # bench_flops calls draw() itself
    python plot_curve.py rows.json [more.json ...] curve.png        # redraw saved rows (matplotlib needed)
    python plot_curve.py --all rows.json curve.png                  # every gamma, top-p width and fitted point

Several rows files are drawn together: a model scored in more than one keeps the rows of the first file it is in.

Why expert FLOPs on x: the dials slim only the experts (30 % of the Shakespeare model's FLOPs), so on whole-model
FLOPs every operating point crowds into a narrow band; the legend says which line is which dial.
"""

import json
import sys

# the dials drawn as lines (points of one dial joined in order of FLOPs) and their markers; the rest are points
LINES = {"uniform": ("o", "uniform width"), "confidence": ("^", "confidence widths"),
         "width_top_p": ("<", "width + top-p, fitted"), "top_p": ("*", "top-p routing")}
POINTS = {"ttt": ("v", "ttt"), "search": ("D", "gamma searched"), "allocate": ("P", "a width per layer"),
          "per_layer": ("x", "per-layer dial")}
FAMILY_MARKERS = ("s", "h", "p", "d")


def lines_of(rows, model, everything=True):
    """{label: [rows]} for one model's dials: uniform widths at its training k, confidence per gamma, top-p per
    width, the fitted pair; each sorted by FLOPs. everything=False keeps one line per dial: confidence at gamma 1
    (where it was run) and top-p at full width."""
    own = [r for r in rows if r["model"] == model]
    k_train = own[0]["k_exp"]                     # bench_flops adds a model's full width at its training k first
    out = {}
    for r in own:
        if r["policy"] == "uniform" and r["k_exp"] == k_train:
            key = ("uniform", None)
        elif r["policy"] == "confidence":
            key = ("confidence", r["gamma"])
        elif r["policy"] == "top_p":
            key = ("top_p", r["width"])
        elif r["policy"] == "width_top_p":
            key = ("width_top_p", None)
        else:
            continue
        out.setdefault(key, []).append(r)
    if not everything:
        gamma_1 = ("confidence", 1.0) in out
        out = {(p, s): v for (p, s), v in out.items()
               if not (p == "confidence" and gamma_1 and s != 1.0) and not (p == "top_p" and s != 1.0)}
    return {k: sorted(v, key=lambda r: r["rel_expert_flops"]) for k, v in out.items()}


def draw_on(ax, rows, everything):
    x = lambda rs: [100 * r["rel_expert_flops"] for r in rs]
    y = lambda rs: [r["val_loss"] for r in rs]
    swept = list(dict.fromkeys(r["model"] for r in rows if r["series"] is None and r["rel_expert_flops"] is not None))
    for n, model in enumerate(swept):
        colour = f"C{n}"
        for (policy, setting), rs in lines_of(rows, model, everything).items():
            marker, what = LINES[policy]
            label = f"{model}: {what}" + (f", gamma {setting:g}" if policy == "confidence" else
                                          f", width {setting:g}" if policy == "top_p" else "")
            style = "-" if policy in ("uniform", "width_top_p") or setting in (None, 1.0) else ":"
            ax.plot(x(rs), y(rs), style, marker=marker, color=colour, ms=5, lw=1.2, alpha=0.9, label=label)
        for policy, (marker, what) in POINTS.items() if everything else ():
            rs = [r for r in rows if r["model"] == model and r["policy"] == policy]
            if rs:
                ax.scatter(x(rs), y(rs), marker=marker, color=colour, s=30, zorder=3, label=f"{model}: {what}")
    families = list(dict.fromkeys(r["series"] for r in rows if r["series"] is not None))
    for n, family in enumerate(families):   # one model per size: its full width at its training k, a marked point
        rs = sorted((next(r for r in rows if r["model"] == m) for m in
                     dict.fromkeys(r["model"] for r in rows if r["series"] == family)),
                    key=lambda r: r["rel_expert_flops"] or 0)
        rs = [r for r in rs if r["rel_expert_flops"] is not None]   # a dense member: its line is drawn below
        ax.scatter(x(rs), y(rs), marker=FAMILY_MARKERS[n % len(FAMILY_MARKERS)], s=90, facecolors="none",
                   edgecolors="k", linewidths=1.5, zorder=4, label=f"{family} ({len(rs)} models, one point each)")
    for r in rows:
        if r["policy"] == "dense":
            ax.axhline(r["val_loss"], color="gray", ls="--", lw=1, label=f"{r['model']}: dense GPT, same FLOPs as "
                                                                         f"full width")
    ax.set_xlabel("expert FLOPs per token, % of the full width at the training k")
    ax.grid(alpha=0.3)


def draw(rows, path, zoom=0.1, everything=False):
    """Two panels of the same curves: every model (the left), and the band within `zoom` nats of the best point
    (the right), where the dials differ. everything: every gamma, every top-p width and the fitted points too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (full, near) = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True)
    low = min(r["val_loss"] for r in rows)
    # the left panel shows every model trained for one size; a plain MoE's untrained narrow widths can be far
    # worse: those points are cut, and counted in its title
    high = max([low + 0.5] + [r["val_loss"] + 0.03 for r in rows if r["series"] is not None])
    for ax, top, what in ((full, high, "every model"), (near, low + zoom, f"within {zoom:g} nats of the best")):
        draw_on(ax, rows, everything)
        ax.set_ylim(low - 0.01, top)
        off = sum(r["val_loss"] > top for r in rows)
        ax.set_title(what + (f" ({off} points above {top:.2f} not shown)" if off else ""), fontsize=10)
    full.set_ylabel("validation loss (nats per token)")
    near.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    everything = "--all" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--all"]
    if len(sys.argv) < 3:
        sys.exit("usage: python plot_curve.py ROWS.json [MORE.json ...] PLOT.png (rows of bench_flops.py --json=...)")
    rows, seen = [], set()
    for path in sys.argv[1:-1]:
        try:
            these = json.load(open(path))
            these[0]["rel_expert_flops"], these[0]["val_loss"], these[0]["series"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            sys.exit(f"plot_curve.py: {path} is not a rows file of bench_flops.py --json ({type(e).__name__})")
        rows += [r for r in these if r["model"] not in seen]
        seen |= {r["model"] for r in these}
    draw(rows, sys.argv[-1], everything=everything)
    print(f"wrote {sys.argv[-1]}")
