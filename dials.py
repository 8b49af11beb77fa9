"""
The compute dials fitted to a FLOPs budget: what sample.py and bench_flops.py call to turn "spend 50 % of the
expert FLOPs" into a width, a width policy or a route_top_p. model.py holds the policies themselves; this file finds
their settings. A budget is a fraction of the full-width expert FLOPs at the k_exp used, in (0, 1]; every fit
meets it on calibration text (windows of the training split, calibration_batches below), never on the text
results are reported on.

  fit_budget        bisect the confidence policy's Gamma until the spent FLOPs meet the budget
  fit_ttt           MoSE's test-time training of gamma (SGD through a differentiable prefix mask: forward's
                    fitting mode, every pair at full width)
  fit_search        gamma by a 1-D search, Gamma refitted at each candidate
  fit_width_top_p   both dials: a uniform width and the top-p routing mass (route_top_p); the policy
                    width_top_p is this fit
  allocate_budget   one width (and optionally k) per MoE layer, greedily
  make_policy       any of the above by name; check_dial_flags checks sample.py's and bench_flops.py's flags
  calibration_batches  windows of the training split: the text every fit meets its budget on
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from model import ConfidenceWidth, check_width, hidden_units

@torch.no_grad()
def expert_flops_fraction(model, policy, batches, k_exp=None, route_top_p=None):
    """Expert FLOPs spent under `policy` (and top-p routing) on `batches`, as a fraction of full-width expert FLOPs
    at k_exp."""
    spent = sum(model(x, width=policy, k_exp=k_exp, route_top_p=route_top_p).stats["expert_flops"].item()
                for x in batches)
    return spent / (len(batches) * model.flops_breakdown(1.0, k_exp)["experts"])   # both per token, per batch


def calibration_inputs(batches, calib_batches=None):
    """The inputs a fit meets its budget on: `calib_batches` if given, else the inputs of all `batches` [(x, y)]
    (the same calibration text that scores its candidates)."""
    return calib_batches or [x for x, _ in batches]


def width_ladder(config, w_min=0.25, step=0.05):
    """The widths a fit steps through: 1, 1 - step, ... down to w_min (included, also off the grid), one per
    distinct hidden-unit count (width_multiple can give neighbours the same h), each named by its widest width."""
    ladder = []
    for i in range(math.ceil((1 - w_min) / step - 1e-9) + 1):
        w = round(max(1.0 - i * step, w_min), 10)
        h = hidden_units(w, config.expert_hidden, config.width_multiple)
        if not ladder or h < hidden_units(ladder[-1], config.expert_hidden, config.width_multiple):
            ladder.append(w)
    return ladder


@torch.no_grad()
def fit_budget(model, policy, batches, budget, k_exp=None, tol=0.01, max_iter=40):
    """Exact-budget mode: bisect Gamma until the spent expert FLOPs on `batches` are within `tol` (relative)
    of `budget` x full-width expert FLOPs. Spent FLOPs grow monotonically with Gamma, so bisection works.
    Returns a new ConfidenceWidth; `policy.gamma` is kept. Raises if the budget is out of reach."""
    make = lambda G: ConfidenceWidth(policy.gamma, G, policy.w_min, policy.grid)
    frac = lambda G: expert_flops_fraction(model, make(G), batches, k_exp)
    lo, hi = 1e-4, 1.0
    while (f := frac(hi)) < budget * (1 - tol):   # clipping at 1 loses budget: Gamma may need to exceed 1
        if hi >= 1e6:                      # a very confident router: the other experts' q is ~0
            raise ValueError(f"budget {budget} is out of reach for gamma={policy.gamma}: at most {f:.3f} of "
                             f"full-width expert FLOPs; lower gamma (or use uniform width)")
        hi *= 4
    if frac(lo) > budget * (1 + tol):
        raise ValueError(f"budget {budget} is below what w_min={policy.w_min} allows; lower w_min")
    for _ in range(max_iter):
        mid = math.sqrt(lo * hi)           # bisect in log space: Gamma spans orders of magnitude
        f = frac(mid)
        if abs(f / budget - 1) <= tol:
            return make(mid)
        lo, hi = (mid, hi) if f < budget else (lo, mid)
    return make(hi)                         # the snapped FLOPs are a step function: take the closest above


def fit_ttt(model, batches, budget, k_exp=None, lr=0.01, per_layer=False, w_min=0.25, grid=0.05,
            refit_every=10, calib_batches=None):
    """Test-time training of the width mapping (MoSE's "TT-width"): with the model and router frozen, learn
    the sharpness gamma (one, or one per MoE layer) that minimises the language-model loss at a given FLOPs
    budget, by SGD through the differentiable prefix mask (the paper: 50 batches of 6 sequences, lr 0.01).
    Gamma is re-fitted to the budget every `refit_every` steps so gamma cannot buy loss with extra FLOPs
    (clipping at w_min spends more than Gamma asks), and once more at the end: the result meets `budget`
    on `calib_batches` (default: all the batches' inputs). Returns a ConfidenceWidth."""
    calib = calibration_inputs(batches, calib_batches)
    rho = torch.full((model.config.n_moe_layers if per_layer else 1,), math.log(math.e - 1),
                     requires_grad=True)                                      # gamma = softplus(rho) = 1
    gamma = lambda: F.softplus(rho) if per_layer else F.softplus(rho)[0]      # one per layer, or one scalar
    opt = torch.optim.SGD([rho], lr=lr)
    was_training, trainable = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        policy = fit_budget(model, ConfidenceWidth(1.0, budget, w_min, grid), calib, budget, k_exp)
        for step, (x, y) in enumerate(batches):
            if step > 0 and step % refit_every == 0:
                policy = fit_budget(model, ConfidenceWidth(gamma().detach(), budget, w_min, grid),
                                    calib, budget, k_exp)
            loss = model(x, y, width=ConfidenceWidth(gamma(), policy.Gamma, w_min, grid), k_exp=k_exp,
                         fitting=True).loss   # every pair at full width behind the differentiable mask
            opt.zero_grad()
            loss.backward()
            opt.step()
        final = gamma().detach()
        return fit_budget(model, ConfidenceWidth(final if per_layer else final.item(), budget, w_min, grid),
                          calib, budget, k_exp)
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def calibration_loss(model, batches, width=None, k_exp=None, route_top_p=None):
    """Mean language-model loss on calibration batches [(x, y)] at a dial (a width, a list, a policy; top-p)."""
    return sum(model(x, y, width=width, k_exp=k_exp, route_top_p=route_top_p).loss.item()
               for x, y in batches) / len(batches)


@torch.no_grad()
def fit_search(model, batches, budget, k_exp=None, w_min=0.25, grid=0.05, gammas=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
               refine=4, calib_batches=None):
    """A gamma that is actually fitted: a 1-D search over gamma on calibration text. Every candidate gets its
    Gamma refitted to the budget (fit_budget on `calib_batches`, default all the batches' inputs) and is
    scored by its true LM loss on `batches`, so candidates are compared at equal spent FLOPs. First the grid
    `gammas`, then `refine` golden-section steps between the best grid point's neighbours; the best gamma
    tried wins. Returns its ConfidenceWidth. Raises ValueError if no gamma can meet the budget."""
    calib = calibration_inputs(batches, calib_batches)
    tried = {}                                                 # gamma -> (calibration loss, fitted policy)

    def score(g):
        if g not in tried:
            try:
                p = fit_budget(model, ConfidenceWidth(g, budget, w_min, grid), calib, budget, k_exp)
                tried[g] = (calibration_loss(model, batches, p, k_exp), p)
            except ValueError:                                 # out of reach at this gamma: never chosen
                tried[g] = (math.inf, None)
        return tried[g][0]

    was_training = model.training
    model.eval()
    try:
        gs = sorted(set(float(g) for g in gammas))
        best = min(range(len(gs)), key=lambda i: score(gs[i]))
        if tried[gs[best]][1] is None:
            raise ValueError(f"budget {budget} is out of reach for every gamma in {gs}: lower w_min or the budget")
        lo, hi = gs[max(best - 1, 0)], gs[min(best + 1, len(gs) - 1)]
        r = (math.sqrt(5) - 1) / 2                             # golden section: one new point per step
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        for _ in range(refine if hi > lo else 0):
            if score(a) <= score(b):
                hi, b, a = b, a, b - r * (b - lo)
            else:
                lo, a, b = a, b, a + r * (hi - a)
        return tried[min(tried, key=lambda g: tried[g][0])][1]
    finally:
        model.train(was_training)


@torch.no_grad()
def largest_route_top_p(model, width, batches, limit, k_exp=None):
    """The largest top-p routing mass whose spent expert FLOPs at `width` stay within `limit` (a fraction of the
    full-width expert FLOPs at k_exp) on `batches`. Spend grows with p, so bisection works; the caller has checked
    that one expert per token (p -> 0) fits."""
    lo, hi = 0.0, 1.0
    for _ in range(14):                                        # 14 halvings: p to within 6e-5
        mid = (lo + hi) / 2
        fits = expert_flops_fraction(model, width, batches, k_exp, route_top_p=max(mid, 1e-6)) <= limit
        lo, hi = (mid, hi) if fits else (lo, mid)
    return max(lo, 1e-6)          # forward takes p > 0; any p below the top probability (>= 1/n_exp) is one expert


@torch.no_grad()
def fit_width_top_p(model, batches, budget, k_exp=None, w_min=0.25, step=0.05, tol=0.01, calib_batches=None):
    """The policy width_top_p: a uniform width and a route_top_p (top-p routing's mass) fitted together to one
    budget. A narrower width costs every token less; top-p lets confident tokens skip their weaker experts. The
    candidates: the widest width on the `step` grid whose k experts fit the budget, and every wider width that
    fits it with top-p routing (up to about k x the budget, where one expert per token is left), each with the
    largest route_top_p that fits (largest_route_top_p on `calib_batches`, default all the batches' inputs).
    "Fits" allows `tol` (relative) over the budget. The candidate with the lowest LM loss on `batches` wins.
    Returns (width, route_top_p); route_top_p None = all k experts (a uniform width)."""
    calib = calibration_inputs(batches, calib_batches)
    cfg, ks = model.config, model.resolve_dials(None, k_exp)[1]
    if not ks:
        raise ValueError("width_top_p is a dial of MoE models; this model is dense (n_exp=0)")
    limit = budget * (1 + tol)
    one_expert = len(ks) / sum(ks)                             # what one expert per token spends of all k
    sizes = {hidden_units(w, cfg.expert_hidden, cfg.width_multiple) / cfg.expert_hidden: w    # h(w) / H -> w
             for w in width_ladder(cfg, w_min, step)}
    all_k = [f for f in sizes if f <= limit]
    candidates = [(sizes[max(all_k)], None)] if all_k else []
    was_training = model.training
    model.eval()                                               # no dropout: the same routing at every trial
    try:
        candidates += [(w, largest_route_top_p(model, w, calib, limit, k_exp)) for f, w in sizes.items()
                       if f > limit and f * one_expert <= limit]
        if not candidates:
            raise ValueError(f"budget {budget} is below what w_min={w_min} allows with one expert per token; "
                             f"lower w_min")
        return min(candidates, key=lambda wp: calibration_loss(model, batches, wp[0], k_exp, wp[1]))
    finally:
        model.train(was_training)


@torch.no_grad()
def allocate_budget(model, batches, budget, k_exp=None, w_min=0.25, step=0.05, k_choices=()):
    """Layer-wise budget allocation: every MoE layer starts at full width (and k_exp); then, greedily, the move
    that raises the LM loss on calibration `batches` least per expert FLOP it saves is taken, until the expert
    FLOPs are within `budget` (a fraction of full width at k_exp). A move narrows one layer to its next width
    on the `step` grid that has fewer hidden units, or (k_choices) gives one layer a smaller k.
    Returns (widths, ks), one of each per MoE layer. Raises ValueError if w_min cannot meet the budget."""
    _, ks = model.resolve_dials(None, k_exp)
    cfg, n = model.config, model.config.n_moe_layers
    experts = lambda w, k: model.flops_breakdown(w, k)["experts"]
    target = budget * experts(1.0, ks)
    ladder = width_ladder(cfg, w_min, step)                    # the widths a layer can step through
    was_training = model.training
    model.eval()
    try:
        widths = [1.0] * n
        loss = calibration_loss(model, batches, widths, ks)
        while experts(widths, ks) > target * (1 + 1e-9):
            moves = []
            for layer in range(n):
                rung = ladder.index(widths[layer])
                if rung + 1 < len(ladder):
                    moves.append(([*widths[:layer], ladder[rung + 1], *widths[layer + 1:]], ks))
                moves += [(widths, [*ks[:layer], k, *ks[layer + 1:]]) for k in k_choices if k < ks[layer]]
            if not moves:
                raise ValueError(f"budget {budget} is below what w_min={w_min} allows; lower w_min")
            best = None
            for w, k in moves:
                saved = experts(widths, ks) - experts(w, k)
                new_loss = calibration_loss(model, batches, w, k)
                if best is None or (new_loss - loss) / saved < best[0]:
                    best = ((new_loss - loss) / saved, w, k, new_loss)
            _, widths, ks, loss = best
        return widths, ks
    finally:
        model.train(was_training)


POLICIES = ("uniform", "confidence", "ttt", "search", "allocate", "width_top_p")
FITTED = {"ttt": "learns gamma", "search": "searches gamma", "allocate": "allocates widths to layers",
          "width_top_p": "fits a width and route_top_p"}   # the policies that need a budget


def check_route_top_p(p):
    if not 0 < p <= 1:
        raise ValueError(f"route_top_p is a probability mass in (0, 1], got {p}")


def check_dial_flags(width, k_exp, policy, budget, gamma, w_min):
    """The dial flags that sample.py and bench_flops.py share, checked alike before any work (a typo costs
    nothing); a bad value raises ValueError with one line. width and k_exp are tuples: one value for every MoE
    layer, or one per MoE layer (k_exp 0: the checkpoint's training value); budget 0 = none. Returns the width as
    one float, or a list of one per MoE layer."""
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in width) or \
            not all(isinstance(k, int) and not isinstance(k, bool) for k in k_exp):
        raise ValueError("--width takes numbers in (0, 1] and --k_exp integers: one value for every MoE layer or "
                         "one per MoE layer, e.g. --width=0.5,1.0 --k_exp=1,2")
    for w in width:
        check_width(float(w))
    if min(k_exp) < 0:
        raise ValueError(f"k_exp must be >= 1, or 0 for the checkpoint's training value; got {min(k_exp)}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got '{policy}'")
    if len(width) > 1 and policy != "uniform":
        raise ValueError(f"one width per MoE layer is a uniform dial; policy '{policy}' takes a single --width")
    if budget and not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1] (a fraction of full-width expert FLOPs), got {budget}")
    if policy in FITTED and not budget:
        raise ValueError(f"policy '{policy}' {FITTED[policy]} for a FLOPs budget: pass --budget in (0, 1]")
    if budget and tuple(width) != (1.0,):   # both would set the compute; silently preferring one hides a mistake
        raise ValueError("--width and --budget both set the compute: give one of them")
    check_width(w_min, "w_min")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (0 = every expert gets the same width), got {gamma}")
    return float(width[0]) if len(width) == 1 else [float(w) for w in width]


def make_policy(model, policy="uniform", width=1.0, budget=None, gamma=1.0, k_exp=None, batches=None,
                w_min=0.25, grid=0.05, ttt_lr=0.01, per_layer=False):
    """The compute dial in one call (sample.py and bench_flops.py use it). Returns a width for forward()
    (width_top_p: a width and a route_top_p).
      uniform:     `width` for every expert; with a budget, the width whose expert FLOPs are that fraction.
      confidence:  ConfidenceWidth(gamma, Gamma=width); with a budget, Gamma is fitted to it on `batches`.
      ttt:         gamma learned on `batches` (a list of (x, y)) for the budget, which it requires.
      search:      gamma searched on `batches`, Gamma refitted to the budget at each candidate (fit_search).
      allocate:    one uniform width per MoE layer, chosen greedily on `batches` for the budget: a list.
      width_top_p: both dials, a uniform width and top-p routing searched on `batches` for the budget
                   (fit_width_top_p): returns (width, route_top_p) for forward (route_top_p None: all k).
    budget: a fraction of the full-width expert FLOPs at k_exp, in (0, 1]."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got '{policy}'")
    check_width(width)
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1] (a fraction of full-width expert FLOPs), got {budget}")
    if policy == "uniform":
        return width if budget is None else budget
    if policy in ("ttt", "search", "allocate", "width_top_p") and budget is None:
        raise ValueError(f"policy '{policy}' fits a FLOPs budget: give a budget in (0, 1]")
    if budget is not None and not batches:
        raise ValueError("fitting a policy to a budget needs calibration batches of text")
    if policy == "confidence":
        p = ConfidenceWidth(gamma, width if budget is None else budget, w_min, grid)
        return p if budget is None else fit_budget(model, p, calibration_inputs(batches), budget, k_exp)
    if policy == "search":
        return fit_search(model, batches, budget, k_exp, w_min, grid)
    if policy == "allocate":
        return allocate_budget(model, batches, budget, k_exp, w_min)[0]
    if policy == "width_top_p":
        return fit_width_top_p(model, batches, budget, k_exp, w_min)
    return fit_ttt(model, batches, budget, k_exp, ttt_lr, per_layer, w_min, grid)


def calibration_batches(split_dir, block_size, n_batches, batch_size, seed=1337, device="cpu", vocab_size=None,
                        holdout_tokens=0):
    """The calibration text that sample.py and bench_flops.py fit width policies on (a budget's Gamma, the
    gamma of ttt and search, the allocator's widths): n_batches of batch_size random windows from the
    *training* split (less train.py's held-out tail), drawn with a fixed seed, so a fit is the same every run
    and never sees the text that results are reported on. Returns [(x, y)], each (batch_size, block_size)
    int64 on device. Raises ValueError with a one-line message."""
    path = os.path.join(split_dir, "train.bin")
    if not os.path.exists(path):
        raise ValueError(f"fitting a policy needs calibration text from the training split: no {path} "
                         f"(set --data_dir and --dataset)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    data = data[:-holdout_tokens] if holdout_tokens else data
    if len(data) <= block_size:
        raise ValueError(f"{path} has {len(data)} tokens: too few for a calibration window of block_size "
                         f"{block_size} + 1")
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist()
        xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))  # (B, T + 1)
        if vocab_size is not None and xy.max() >= vocab_size:   # e.g. GPT-2 tokens fed to a char model
            raise ValueError(f"{path} has token ids up to {int(xy.max())}, beyond the model's vocabulary "
                             f"({vocab_size}): is it the dataset the model was trained on?")
        xy = xy.to(device)
        batches.append((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
    return batches
