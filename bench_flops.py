"""
The accuracy-compute curve: validation loss against forward FLOPs per token, for one trained MoSE model at
many operating points (uniform widths, k_exp, width x k, the confidence policy, ttt at FLOPs budgets), next
to the baselines' points (a plain MoE over its k_exp and width dials, a dense GPT).

    python bench_flops.py --out_dir=out-shakespeare-mose --compare=out-shakespeare-moe,out-shakespeare-dense

Every row is measured here: the loss on the validation split (with its standard error over sequences), the
FLOPs the forward actually spent, the tokens per second of the forward. --json=PATH writes the rows,
--plot=PATH.png draws the curves (matplotlib, optional).
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import configure, fail, setup_device
from model import check_width, load_checkpoint, make_policy

# -----------------------------------------------------------------------------
out_dir = "out-shakespeare-mose"   # the MoSE checkpoint to sweep
compare = ""                       # comma-separated checkpoint dirs of baselines (plain MoE, dense)
data_dir = ""                      # '' = from the checkpoint's config
dataset = ""
eval_tokens = 131072               # validation tokens per operating point (non-overlapping windows)
batch_size = 32
widths = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
grid_widths = (0.25, 0.5, 0.75)    # width x k_exp combinations
gammas = (0.0, 1.0, 2.0, 4.0, 8.0) # confidence policy, each fitted to every budget in conf_budgets
conf_budgets = (0.75, 0.5, 0.3)
ttt_budgets = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3)
ttt_batches = 50                   # the paper: 50 batches of 6 sequences, SGD lr 0.01
ttt_batch_size = 6
ttt_lr = 0.01
ttt_per_layer = False              # one gamma per MoE layer instead of one for the model
w_min = 0.25
quick = False                      # a handful of points (CI smoke test)
json_path = ""                     # --json_path=rows.json (also accepted as --json=rows.json)
plot = ""                          # --plot=curve.png
device = "auto"
dtype = "auto"
seed = 1337
sys.argv = [a.replace("--json=", "--json_path=", 1) for a in sys.argv]   # 'json' would shadow the module
config = configure(globals())
# -----------------------------------------------------------------------------

if plot:   # check for the optional package now, not after a sweep of many minutes
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib: pip install matplotlib")
if quick:
    widths, grid_widths, gammas, conf_budgets, ttt_budgets, ttt_batches = (1.0, 0.5), (0.5,), (2.0,), (0.5,), (0.5,), 5
try:
    for w in (*widths, *grid_widths, w_min):
        check_width(w)
    for b in (*conf_budgets, *ttt_budgets):
        if not w_min <= b <= 1:
            raise ValueError(f"budgets must be in [w_min={w_min}, 1] (fractions of full-width expert FLOPs), got {b}")
except ValueError as e:
    fail(str(e))
device, device_type, dtype, ctx = setup_device(device, dtype)
torch.manual_seed(seed)

# the models: the MoSE checkpoint first, then the baselines
models = {}
for d in [out_dir] + [c for c in compare.split(",") if c]:
    try:
        model, ckpt = load_checkpoint(os.path.join(d, "ckpt.pt"), device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    models[os.path.basename(os.path.normpath(d))] = (model.eval(), ckpt)
main_name = next(iter(models))
main_model, main_ckpt = models[main_name]
data_dir = data_dir or main_ckpt["config"]["data_dir"]
dataset = dataset or main_ckpt["config"]["dataset"]
T = main_model.config.block_size
for name, (m, _) in models.items():
    if m.config.block_size != T:
        fail(f"{name} has block_size {m.config.block_size}, {main_name} {T}: compare models of one context length")


def load_split(split):
    path = os.path.join(data_dir, dataset, f"{split}.bin")
    if not os.path.exists(path):
        fail(f"no {path}: run `python prepare_data.py {dataset}` or pass --data_dir")
    return np.memmap(path, dtype=np.uint16, mode="r")


# validation: non-overlapping windows from the start of the split, the same for every row (so differences
# between rows are paired); on Tiny Shakespeare the default covers the whole split
val = load_split("val")
n_windows = min(eval_tokens // T, (len(val) - 1) // T)
if n_windows < 2:   # a standard error needs at least two windows
    fail(f"{dataset}'s val.bin has {len(val)} tokens, fewer than two windows of block_size {T} + 1: "
         f"use more text" + (f" or a larger --eval_tokens (now {eval_tokens})" if eval_tokens // T < 2 else ""))
starts = np.arange(n_windows) * T
val_batches = []
for i in range(0, n_windows, batch_size):
    s = starts[i:i + batch_size]
    x = torch.from_numpy(np.stack([val[j:j + T] for j in s]).astype(np.int64)).to(device)
    y = torch.from_numpy(np.stack([val[j + 1:j + 1 + T] for j in s]).astype(np.int64)).to(device)
    val_batches.append((x, y))
# calibration text for fitting policies comes from the train split: never fit on what is reported
train = load_split("train")
if len(train) <= T:
    fail(f"{dataset}'s train.bin has {len(train)} tokens, too few for a calibration window of block_size {T} + 1")
gen = torch.Generator().manual_seed(seed)
calib_batches = []
for _ in range(ttt_batches):
    ix = torch.randint(len(train) - T, (ttt_batch_size,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([train[j:j + T] for j in ix]).astype(np.int64)).to(device)
    y = torch.from_numpy(np.stack([train[j + 1:j + 1 + T] for j in ix]).astype(np.int64)).to(device)
    calib_batches.append((x, y))
print(f"evaluating on {n_windows * T:,} validation tokens of {dataset} ({n_windows} windows of {T}), "
      f"device {device}, dtype {dtype}")


@torch.no_grad()
def evaluate(model, width, k_exp):
    """Mean validation loss, its standard error over the windows, spent FLOPs/token, forward tokens/s."""
    seq_losses, expert_flops, seconds = [], [], 0.0
    with ctx:
        model(*val_batches[0], width=width, k_exp=k_exp)   # warm-up, untimed: first calls allocate
    for x, y in val_batches:
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        with ctx:
            out = model(x, y, width=width, k_exp=k_exp)
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds += time.time() - t0
        ce = F.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none")   # (B, T)
        seq_losses.append(ce.mean(dim=1).cpu())
        expert_flops.append(out.stats["expert_flops"].item() * x.size(0))
    seq_losses = torch.cat(seq_losses).double()
    expert = sum(expert_flops) / len(seq_losses)
    total = model.flops_breakdown(1.0, k_exp)["non_expert"] + expert
    return dict(val_loss=seq_losses.mean().item(), val_loss_stderr=(seq_losses.std() / math.sqrt(len(seq_losses))).item(),
                flops_per_token=total, expert_flops_per_token=expert,
                tokens_per_s=len(seq_losses) * T / seconds), seq_losses


reference = main_model.flops_breakdown()   # the MoE at full width and its training k: rel = 1
rows, seq_losses = [], {}


def add_row(name, policy, width, k_exp, gamma=None, budget=None):
    model = models[name][0]
    k = (k_exp or model.config.k_exp) if model.config.n_exp else None
    result, per_seq = evaluate(model, width if model.config.n_exp else None, k)
    row = dict(model=name, policy=policy,
               width=width if isinstance(width, float) else getattr(width, "Gamma", None),
               k_exp=k, gamma=gamma, budget=budget, **result,
               rel_flops=result["flops_per_token"] / reference["total"],
               rel_expert_flops=result["expert_flops_per_token"] / reference["experts"] if reference["experts"] else None)
    rows.append(row)
    seq_losses[len(rows) - 1] = per_seq
    print(format_row(row), flush=True)


def format_row(r):
    fmt = lambda v, f: "-" if v is None else (f.format(v) if not isinstance(v, list) else "/".join(f"{x:.2f}" for x in v))
    return (f"{r['model'][:24]:<24} {r['policy']:<10} {fmt(r['width'], '{:.3f}'):>6} {fmt(r['k_exp'], '{:d}'):>3} "
            f"{fmt(r['gamma'], '{:.2f}'):>6} {fmt(r['budget'], '{:.2f}'):>6} {r['flops_per_token'] / 1e6:9.3f} "
            f"{r['rel_flops']:6.3f} {r['expert_flops_per_token'] / 1e6:9.3f} {fmt(r['rel_expert_flops'], '{:.3f}'):>6} "
            f"{r['val_loss']:7.4f} ±{r['val_loss_stderr']:.4f} {math.exp(r['val_loss']):7.3f} {r['tokens_per_s']:9,.0f}")


def fit_policy(policy, **kw):
    """A policy fitted to a budget on the calibration text, or None (and a note) when the budget is out of its
    reach, e.g. a high budget at a large gamma: the sweep goes on without that point."""
    try:
        return make_policy(main_model, policy, k_exp=main_model.config.k_exp, batches=calib_batches, w_min=w_min, **kw)
    except ValueError as e:
        print(f"  (skipped {policy} {kw}: {e})")
        return None


print(f"{'model':<24} {'policy':<10} {'width':>6} {'k':>3} {'gamma':>6} {'budget':>6} {'MFLOP/tok':>9} {'rel':>6} "
      f"{'expMFLOP':>9} {'rel':>6} {'val loss':>7} {'± se':>7} {'ppl':>7} {'tok/s':>9}")
for name, (model, ckpt) in models.items():
    n_exp, k_train = model.config.n_exp, model.config.k_exp
    if n_exp == 0:
        add_row(name, "dense", 1.0, None)
        continue
    for w in sorted(widths, reverse=True):                     # uniform width at the training k
        add_row(name, "uniform", float(w), k_train)
    for k in range(1, (2 if quick else n_exp) + 1):            # elastic top-k at full width
        if k != k_train:
            add_row(name, "uniform", 1.0, k)
    for w in grid_widths:                                      # width x k
        for k in range(1, min(n_exp, 2 * k_train) + 1):
            if k != k_train:
                add_row(name, "uniform", float(w), k)
    if name != main_name:   # the policies are MoSE's: baselines get the dials they have
        continue
    for budget in conf_budgets:
        for g in gammas:
            policy = fit_policy("confidence", budget=budget, gamma=g)
            if policy is not None:
                add_row(name, "confidence", policy, k_train, g, budget)
    for budget in ttt_budgets:
        t0 = time.time()
        policy = fit_policy("ttt", budget=budget, ttt_lr=ttt_lr, per_layer=ttt_per_layer)
        if policy is None:
            continue
        g = policy.gamma.tolist() if isinstance(policy.gamma, torch.Tensor) else policy.gamma
        add_row(name, "ttt", policy, k_train, g, budget)
        print(f"  (ttt fitted in {time.time() - t0:.1f}s on {len(calib_batches)} train batches)")


# -----------------------------------------------------------------------------
# the Pareto frontier and the savings at matched loss


def frontier(rs):
    """Rows not dominated: no other row has fewer or equal FLOPs and a lower loss."""
    rs = sorted(rs, key=lambda r: (r["flops_per_token"], r["val_loss"]))
    out, best = [], float("inf")
    for r in rs:
        if r["val_loss"] < best:
            out.append(r)
            best = r["val_loss"]
    return out


def paired_difference(i, j):
    """Row i's loss minus row j's, '+d ± se': per-window differences over the same windows cancel most of the
    noise that the windows share, so this is far more precise than either row's own standard error."""
    diff = seq_losses[i] - seq_losses[j]
    return f"{diff.mean():+.4f} ± {diff.std() / math.sqrt(len(diff)):.4f}"


def flops_to_reach(front, loss, key):
    """The fewest FLOPs (key) on a frontier that reach a loss <= `loss`, interpolating linearly between
    neighbouring frontier points (an operating point between them can be had by mixing the two)."""
    for a, b in zip([None] + front, front):
        if b["val_loss"] <= loss:
            if a is None or a["val_loss"] == b["val_loss"]:
                return b[key]
            t = (a["val_loss"] - loss) / (a["val_loss"] - b["val_loss"])
            return a[key] + t * (b[key] - a[key])
    return None


print("\nPareto frontier (all models):")
for r in frontier(rows):
    print("  " + format_row(r))
main_front = frontier([r for r in rows if r["model"] == main_name])
for name, (model, _) in models.items():
    if name == main_name:
        continue
    base = [r for r in rows if r["model"] == name]
    print(f"\n{main_name} vs {name}: FLOPs {main_name} needs to match each of {name}'s frontier points")
    for r in frontier(base):
        need = flops_to_reach(main_front, r["val_loss"], "flops_per_token")
        need_e = flops_to_reach(main_front, r["val_loss"], "expert_flops_per_token")
        point = f"  {r['policy']} w={r['width']:g} k={r['k_exp'] or '-'}: loss {r['val_loss']:.4f} at " \
                f"{r['flops_per_token'] / 1e6:.3f} MFLOPs/token"
        if need is None:
            print(f"{point}; {main_name} never reaches this loss")
            continue
        saved_e = f", {1 - need_e / r['expert_flops_per_token']:+.1%} of expert FLOPs" if r["expert_flops_per_token"] else ""
        print(f"{point}; {main_name} reaches it with {need / 1e6:.3f}: saves {1 - need / r['flops_per_token']:+.1%} "
              f"of total FLOPs{saved_e}")
    ref = next((i for i, r in enumerate(rows) if r["model"] == name and r["policy"] != "confidence"
                and r["width"] == 1.0 and r["k_exp"] == (model.config.k_exp if model.config.n_exp else None)), None)
    mine = next(i for i, r in enumerate(rows) if r["model"] == main_name and r["width"] == 1.0
                and r["k_exp"] == main_model.config.k_exp and r["policy"] == "uniform")
    print(f"  at full width: {main_name} - {name} = {paired_difference(mine, ref)} "
          f"nats (paired over the same {len(seq_losses[mine])} validation windows)")

# do per-token widths beat one width for all at the same budget?
uniform_at = {r["width"]: i for i, r in enumerate(rows) if r["model"] == main_name and r["policy"] == "uniform"
              and r["k_exp"] == main_model.config.k_exp}
pairs = [(i, uniform_at[r["budget"]]) for i, r in enumerate(rows)
         if r["model"] == main_name and r["policy"] in ("confidence", "ttt") and r["budget"] in uniform_at]
if pairs:
    print(f"\n{main_name}: width policies against uniform width = budget (paired over the same windows)")
for i, j in pairs:
    r = rows[i]
    gamma = "/".join(f"{g:.2f}" for g in r["gamma"]) if isinstance(r["gamma"], list) else f"{r['gamma']:.2f}"
    print(f"  {r['policy']:<10} gamma {gamma:>5}, budget {r['budget']:.2f} (spent {r['rel_expert_flops']:.3f}): "
          f"{r['val_loss']:.4f} - {rows[j]['val_loss']:.4f} = {paired_difference(i, j)}")

if json_path:
    keys = ("model", "policy", "width", "k_exp", "gamma", "budget", "flops_per_token", "expert_flops_per_token",
            "rel_flops", "rel_expert_flops", "val_loss", "val_loss_stderr", "tokens_per_s")
    with open(json_path, "w") as f:
        json.dump([{k: r[k] for k in keys} for r in rows], f, indent=1)
    print(f"wrote {len(rows)} rows to {json_path}")
if plot:   # matplotlib was imported at start-up, so a missing package never costs a finished sweep
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"uniform": "o", "confidence": "^", "ttt": "v", "dense": "s"}
    for n, name in enumerate(models):   # one colour per model, one marker per policy, its frontier dashed
        for policy, marker in markers.items():
            rs = [r for r in rows if r["model"] == name and r["policy"] == policy]
            if rs:
                ax.scatter([r["flops_per_token"] / 1e6 for r in rs], [r["val_loss"] for r in rs], marker=marker,
                           color=f"C{n}", s=18, alpha=0.7, label=f"{name}: {policy}")
        f = frontier([r for r in rows if r["model"] == name])
        if len(f) > 1:
            ax.plot([r["flops_per_token"] / 1e6 for r in f], [r["val_loss"] for r in f], "--", color=f"C{n}", lw=1)
    # the interesting part: up to 0.6 nats above the best point (a narrow, untrained width is far worse)
    low = min(r["val_loss"] for r in rows)
    high = min(max(r["val_loss"] for r in rows), low + 0.6)
    ax.set_ylim(low - 0.02, high + 0.02)
    off = sum(r["val_loss"] > high + 0.02 for r in rows)
    ax.set_title(f"validation loss against forward FLOPs (dashed: each model's frontier)"
                 + (f"; {off} points above {high + 0.02:.2f} not shown" if off else ""), fontsize=9)
    ax.set_xlabel("forward MFLOPs per token")
    ax.set_ylabel("validation loss (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"wrote {plot}")
