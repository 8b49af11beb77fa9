"""Tests of the dials: Matryoshka MoE's training variants (capacity-aware k, top-p routing, a k per
micro-batch), per-layer dials in the scripts, the gamma search and the layer-wise budget allocator.
Run: python -m pytest -q test_dials.py"""

import math
import pickle

import pytest
import torch

from test_dispatch import masked_reference
from model import GPT, GPTConfig
from test_model import tiny, tokens


# --- top-p routing ---------------------------------------------------------------------------------------

def top_p_by_hand(probs, p, k):
    """The definition, one token at a time: the fewest most-probable experts whose mass reaches p, capped at k."""
    out = []
    for row in probs.tolist():
        ranked, mass, n = sorted(row, reverse=True), 0.0, 0
        while n < k and (n == 0 or mass < p):
            mass, n = mass + ranked[n], n + 1
        out.append(n)
    return torch.tensor(out)


@pytest.mark.parametrize("p", [0.1, 0.4, 0.6, 0.9, 1.0])
def test_top_p_router_takes_experts_until_the_mass_reaches_p(p):
    model = tiny(n_exp=8)
    router = model.transformer.h[0].mlp.router
    with torch.no_grad():
        router.w_g.weight.normal_(0, 0.3)   # a spread of confidences, so the counts differ between tokens
    x = torch.randn(200, 64)
    r = router(x, 4, route_top_p=p)
    n = r.used.sum(dim=1)
    assert torch.equal(n, top_p_by_hand(r.probs, p, 4))
    assert (r.used[:, :-1].int() >= r.used[:, 1:].int()).all()            # a prefix of the ranked experts
    assert torch.all(r.gates[~r.used] == 0)
    torch.testing.assert_close(r.gates.sum(dim=1), torch.ones(200))
    used_probs = r.probs.gather(1, r.expert_idx) * r.used
    torch.testing.assert_close(r.gates, used_probs / used_probs.sum(dim=1, keepdim=True))
    assert torch.allclose(r.load.sum(), torch.tensor(1.0))                 # fractions of the used pairs only
    if p in (0.4, 0.6):
        assert 1 < n.float().mean() < 4 and n.min() == 1                  # really variable per token


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_top_p_layer_matches_reference_and_spends_only_used_pairs(width):
    model = tiny(n_exp=8, bias=True)
    layer = model.transformer.h[0].mlp
    torch.manual_seed(3)
    with torch.no_grad():
        layer.router.w_g.weight.normal_(0, 0.3)
        layer.experts.b_fc.normal_(0, 0.1)
        layer.experts.b_proj.normal_(0, 0.1)
    x = torch.randn(2, 30, 64)
    results = []
    for fast in (True, False):
        model.zero_grad()
        xx = x.clone().requires_grad_()
        if fast:
            out = layer(xx, width, 4, None, 0.6)
            y, r, spent = out.y, out.routing, out.spent
        else:
            r = layer.router(xx.view(60, 64), 4, route_top_p=0.6)
            h = layer.experts.hidden_units(torch.full_like(r.gates, width)) * r.used
            y = masked_reference(layer.experts, xx.view(60, 64), r.expert_idx, r.gates, h).view(2, 30, 64)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # FLOPs: 4 C h for each used pair, nothing for the unused ones
    h = layer.experts.hidden_units(width)
    torch.testing.assert_close(spent, 4 * 64 * h * r.used.sum(dim=1).float())


def test_top_p_model_stats_and_bad_value():
    model = tiny(n_exp=8, moe_stride=1)
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.router.w_g.weight.normal_(0, 0.3)
    out = model(tokens(), tokens(seed=2), k_exp=4, route_top_p=0.5)
    ept = out.stats["experts_per_token"]
    assert len(ept) == 2 and all(1 <= e < 4 for e in ept)
    # spent expert FLOPs: the mean number of used experts, at full width, summed over the layers
    assert math.isclose(out.stats["expert_flops"].item(), sum(4 * 64 * 256 * e for e in ept), rel_tol=1e-5)
    full = model(tokens(), tokens(seed=2), k_exp=4)
    assert full.stats["experts_per_token"] == [4.0, 4.0]
    assert out.stats["expert_flops"] < full.stats["expert_flops"]
    torch.testing.assert_close(model(tokens(), k_exp=4, route_top_p=1.0).logits, model(tokens(), k_exp=4).logits)
    with pytest.raises(ValueError, match=r"route_top_p is a probability mass in \(0, 1\], got 1.5"):
        model(tokens(), route_top_p=1.5)


# --- Matryoshka MoE's k_sampling variants in train.py ------------------------------------------------------

FAST = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--n_exp=4", "--k_exp=2", "--expert_hidden=64", "--batch_size=2",
        "--block_size=16", "--eval_iters=1", "--log_interval=1", "--moe_stride=1", "--width_sampling=none",
        "--always_save_checkpoint=True"]


def train_rows(data_dir, out_dir, *extra, steps):
    from test_train import log_rows, run
    run(f"--data_dir={data_dir}", f"--out_dir={out_dir}", *FAST, f"--max_iters={steps}", f"--eval_interval={steps}",
        *extra)
    rows = [r for r in log_rows(out_dir) if "loss" in r]
    assert [r["iter"] for r in rows] == list(range(1, steps + 1))
    flops = [b["train_flops"] - a for a, b in zip([0.0] + [r["train_flops"] for r in rows], rows)]
    from checkpoint import load_checkpoint
    return rows, flops, load_checkpoint(str(out_dir / "ckpt.pt"))[0]


def test_capacity_aware_k_sampling(char_data, tmp_path):
    # P(k) ∝ exp(log(k) / tau) = k^(1/tau) over [k_min, k_max], for each MoE layer, each step. tau = 0.5
    # (P ∝ k^2: 1/30, 4/30, 9/30, 16/30) is far from uniform, so the statistics can tell the two apart.
    steps, tau = 150, 0.5
    rows, flops, model = train_rows(char_data, tmp_path, "--k_sampling=capacity", "--k_max=4", f"--k_tau={tau}",
                                    steps=steps)
    ks = [r["k"] for r in rows]
    p = torch.arange(1, 5, dtype=torch.float64) ** (1 / tau)
    gen = torch.Generator().manual_seed(1337 + 1)   # train.py's width_gen: seed + 1, nothing else draws from it
    assert ks == [(1 + torch.multinomial(p, 2, replacement=True, generator=gen)).tolist() for _ in range(steps)]
    draws = torch.tensor(ks).flatten()
    freq = torch.bincount(draws, minlength=5)[1:].double() / len(draws)
    p = p / p.sum()
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / len(draws)).sqrt()), (freq, p)
    assert freq[3] > 0.4 and freq[0] < 0.1                 # k=4 most often, k=1 rarely (uniform: 0.25 each)
    # the FLOPs spent: forward + backward (3x) of each step's tokens at its per-layer k, full width
    for k, f in zip(ks, flops):
        assert math.isclose(f, 3 * 2 * 16 * model.flops_per_token(1.0, k), rel_tol=1e-9)


def test_a_k_per_micro_batch(char_data, tmp_path):
    steps = 30
    rows, flops, model = train_rows(char_data, tmp_path / "micro", "--k_sampling=micro", "--k_max=3",
                                    "--gradient_accumulation_steps=3", steps=steps)
    ks = [r["k"] for r in rows]
    gen = torch.Generator().manual_seed(1337 + 1)
    assert ks == [[int(torch.randint(1, 4, (), generator=gen)) for _ in range(3)] for _ in range(steps)]
    assert sum(len(set(k)) > 1 for k in ks) > steps / 2      # k changes between the micro-batches of a step
    assert set(sum(ks, [])) == {1, 2, 3}
    for k, f in zip(ks, flops):   # each micro-batch of 2 x 16 tokens spends at its own k, in every MoE layer
        assert math.isclose(f, sum(3 * 2 * 16 * model.flops_per_token(1.0, m) for m in k), rel_tol=1e-9)
    # 'step': one k for all micro-batches (and layers) of the step
    rows, flops, _ = train_rows(char_data, tmp_path / "step", "--k_sampling=step", "--k_max=3",
                                "--gradient_accumulation_steps=3", steps=10)
    for r, f in zip(rows, flops):
        assert isinstance(r["k"], int) and math.isclose(f, 3 * 3 * 2 * 16 * model.flops_per_token(1.0, r["k"]),
                                                        rel_tol=1e-9)


def test_top_p_routing_in_training(char_data, tmp_path):
    # a fresh router is nearly uniform over the 4 experts (p ~ 0.25 each): a mass of 0.28 takes one expert for
    # the more confident tokens and two for the others
    rows, flops, model = train_rows(char_data, tmp_path, "--k_sampling=top_p", "--route_top_p=0.28", "--k_max=4",
                                    steps=20)
    ept = [r["experts_per_token"] for r in rows]
    assert all(r["k"] == 4 and len(e) == 2 and all(1 <= x <= 4 for x in e) for r, e in zip(rows, ept))
    assert 1 < sum(sum(ept, [])) / 40 < 4                    # neither always one expert nor always k_max
    assert len({x for e in ept for x in e}) > 5              # the mass decides, token by token
    non_expert = model.flops_breakdown()["non_expert"]
    for e, f in zip(ept, flops):   # only the used (token, expert) pairs are counted: 4 C H each, full width
        assert math.isclose(f, 3 * 2 * 16 * (non_expert + sum(4 * 32 * 64 * x for x in e)), rel_tol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--k_sampling=capcity"], "k_sampling must be one of none, layer, capacity, step, micro, top_p, got 'capcity'"),
    (["--k_sampling=capacity", "--k_tau=0"], "--k_tau must be > 0, got 0.0"),
    (["--k_sampling=top_p", "--route_top_p=1.5"], "--route_top_p must be a probability mass in (0, 1]"),
    (["--k_sampling=top_p", "--k_min=2", "--k_max=3"], "leave k_min at 1 and k_pool at 0"),
])
def test_bad_k_sampling_values_are_one_clear_line(char_data, tmp_path, args, message):
    from test_train import run
    p = run(f"--data_dir={char_data}", f"--out_dir={tmp_path}", *FAST, *args, ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert message in p.stderr, p.stderr


# --- per-layer dials in sample.py and bench_flops.py ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_layer_ckpt(request, tmp_path_factory):
    """A tiny checkpoint with two MoE layers (moe_stride=1) on the text test_sample.py uses."""
    from test_sample import make_text, write_checkpoint, write_data
    root = tmp_path_factory.mktemp("dials")
    text = make_text(request)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    train = write_data(root, text, lambda s: [stoi[c] for c in s])
    with open(root / "data" / "tiny" / "meta.pkl", "wb") as f:   # the tokenizer, as prepare_data.py writes it
        pickle.dump(meta, f)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=32, n_exp=4, k_exp=2,
                          expert_hidden=64, moe_stride=1))
    write_checkpoint(root / "mose", model, meta, root / "data", 20, train, (None, 0.5))
    return root / "mose", model


def script(name, *args):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, name, *args], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                          capture_output=True, text=True, timeout=600)


def test_sample_per_layer_width_and_k(two_layer_ckpt):
    import re
    ckpt, model = two_layer_ckpt
    p = script("sample.py", f"--out_dir={ckpt}", "--num_samples=1", "--max_new_tokens=24", "--width=0.5,1.0",
               "--k_exp=1,2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "widths per MoE layer [0.5, 1.0], k_exp [1, 2]" in p.stdout
    # the printed FLOPs are the spent ones: layer 0 runs one expert at 32 of 64 units, layer 1 two at 64
    spent = float(re.search(r"spent ([\d.]+) MFLOPs/token", p.stdout)[1])
    assert spent == round(model.flops_breakdown([0.5, 1.0], [1, 2])["total"] / 1e6, 3)
    experts = float(re.search(r"experts ([\d.]+) %", p.stdout)[1])
    assert experts == round(100 * (32 * 1 + 64 * 2) / (64 * 1 + 64 * 2), 1)   # of full width at k = 1, 2


def test_bench_flops_per_layer_row_search_and_allocate(two_layer_ckpt, tmp_path):
    import json
    import re
    ckpt, model = two_layer_ckpt
    out = tmp_path / "rows.json"
    p = script("bench_flops.py", f"--out_dir={ckpt}", "--quick=True", "--eval_tokens=2048", "--width=0.5,1.0",
               "--k_exp=1,2", "--allocate_k=True", f"--json={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.load(open(out))
    row = next(r for r in rows if r["policy"] == "per_layer")
    assert row["width"] == [0.5, 1.0] and row["k_exp"] == [1, 2]
    assert math.isclose(row["expert_flops_per_token"], 4 * 32 * (32 * 1 + 64 * 2), rel_tol=1e-6)
    assert math.isclose(row["flops_per_token"], model.flops_breakdown([0.5, 1.0], [1, 2])["total"], rel_tol=1e-6)
    # the allocator's point: a width and a k per MoE layer, uniform per layer, so its spent FLOPs are exact
    alloc = next(r for r in rows if r["policy"] == "allocate")
    assert alloc["budget"] == 0.5 and len(alloc["width"]) == len(alloc["k_exp"]) == 2
    assert math.isclose(alloc["flops_per_token"], model.flops_breakdown(alloc["width"], alloc["k_exp"])["total"],
                        rel_tol=1e-6)
    assert alloc["rel_expert_flops"] <= 0.5 + 1e-9
    search = next(r for r in rows if r["policy"] == "search")
    assert search["budget"] == 0.5 and search["gamma"] >= 0 and abs(search["rel_expert_flops"] / 0.5 - 1) < 0.1
    # paired against uniform width = budget, and gamma three ways side by side
    assert re.search(r"allocate +widths [\d./]+ k [\d/]+, budget 0\.50 \(spent [\d.]+\): [\d.]+ - [\d.]+ = [+-]", p.stdout)
    assert re.search(r"search +gamma [\d.]+, budget 0\.50", p.stdout)
    assert re.search(r"budget 0\.50: search gamma [\d.]+ [\d.]+ \| ttt gamma [\d.]+ [\d.]+ \| best of grid gamma "
                     r"[\d.]+ [\d.]+; search - best of grid = [+-][\d.]+ ± [\d.]+", p.stdout), p.stdout


@pytest.mark.parametrize("script_name,args,message", [
    ("sample.py", ["--width=0.5,1.0,0.5"], "--width has 3 values but the model has 2 MoE layers: give one value, or "
                                           "one per MoE layer"),
    ("sample.py", ["--k_exp=1,2,3"], "--k_exp has 3 values but the model has 2 MoE layers"),
    ("sample.py", ["--k_exp=1,5"], "k_exp must be an integer in [1, n_exp=4], got 5"),
    ("sample.py", ["--width=0.5,0"], "width must be in (0, 1], got 0.0"),
    ("sample.py", ["--width=0.5,1.0", "--policy=confidence"], "one width per MoE layer is a uniform dial"),
    ("bench_flops.py", ["--width=0.5,1.0,0.5"], "--width has 3 values but mose has 2 MoE layers"),
    ("bench_flops.py", ["--k_exp=1,5"], "k_exp must be an integer in [1, n_exp=4], got 5"),   # sample.py's flags, checks
    ("bench_flops.py", ["--k_exp=-1,2"], "k_exp must be >= 1, or 0 for the checkpoint's training value; got -1"),
    ("bench_flops.py", ["--width=0.5,1.0", "--policy=confidence"], "one width per MoE layer is a uniform dial"),
])
def test_bad_per_layer_dials_are_one_clear_line(two_layer_ckpt, script_name, args, message):
    p = script(script_name, f"--out_dir={two_layer_ckpt[0]}", *args)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


# --- gamma search, the layer-wise allocator, calibration text -------------------------------------------------

def calib(n=6, B=4, T=32):
    return [(tokens(B, T, seed=10 + i), tokens(B, T, seed=100 + i)) for i in range(n)]


def sharp_router(model):
    with torch.no_grad():   # confident, varied routers so the policies have something to work with
        for block in model.transformer.h:
            if hasattr(block.mlp, "router"):
                block.mlp.router.w_g.weight.normal_(0, 0.5)
    return model


def test_search_meets_the_budget_and_beats_every_gamma_of_its_grid():
    from dials import calibration_loss, expert_flops_fraction, fit_budget, fit_search, make_policy
    from model import ConfidenceWidth
    model, batches = sharp_router(tiny(moe_stride=1)), calib()
    xs = [x for x, _ in batches]                           # what the fit meets its budget on: all of them
    grid = (0.0, 1.0, 2.0, 4.0)
    p = fit_search(model, batches, 0.5, gammas=grid, refine=3)
    assert isinstance(p, ConfidenceWidth)
    assert abs(expert_flops_fraction(model, p, xs) / 0.5 - 1) <= 0.01          # Gamma refitted to the budget
    best = calibration_loss(model, batches, p)
    for g in grid:   # the reference: each grid gamma, Gamma refitted, scored on the same text
        q = fit_budget(model, ConfidenceWidth(g, 0.5), xs, 0.5)
        assert best <= calibration_loss(model, batches, q) + 1e-12
    assert make_policy(model, "search", budget=0.5, batches=batches[:2]).gamma == \
        fit_search(model, batches[:2], 0.5, calib_batches=[x for x, _ in batches[:2]]).gamma   # make_policy's way in
    with pytest.raises(ValueError, match="policy 'search' fits a FLOPs budget"):
        make_policy(model, "search", batches=batches)


def test_allocator_narrows_the_layer_that_costs_least_first():
    from dials import allocate_budget, calibration_loss, make_policy
    model, batches = sharp_router(tiny(moe_stride=1)), calib()
    with torch.no_grad():   # layer 1's experts add nothing: narrowing them is free, narrowing layer 0 is not
        model.transformer.h[1].mlp.experts.c_proj.zero_()
    # 2 equal layers: layer 1 at w_min 0.25 spends (1 + 0.25) / 2 = 0.625 of the expert FLOPs
    assert allocate_budget(model, batches, 0.625) == ([1.0, 0.25], [2, 2])
    widths, ks = allocate_budget(model, batches, 0.5)
    assert widths[1] == 0.25 and widths[0] < 1 and ks == [2, 2]
    spent = model.flops_breakdown(widths, ks)["experts"] / model.flops_breakdown()["experts"]
    assert 0.5 - 0.05 / 2 < spent <= 0.5                                          # within one step of the budget
    assert make_policy(model, "allocate", budget=0.5, batches=batches) == widths
    # with k as a move too: the result still meets the budget, and k only ever goes down
    widths, ks = allocate_budget(model, batches, 0.3, k_choices=(1,))
    assert model.flops_breakdown(widths, ks)["experts"] <= 0.3 * model.flops_breakdown()["experts"] * (1 + 1e-9)
    assert all(k in (1, 2) for k in ks)
    with pytest.raises(ValueError, match="below what w_min=0.25 allows"):
        allocate_budget(model, batches, 0.2)
    # against the same budget spent uniformly, on the calibration text it was chosen on
    widths, ks = allocate_budget(model, batches, 0.5)
    assert calibration_loss(model, batches, widths) <= calibration_loss(model, batches, 0.5)


def test_width_top_p_meets_the_budget_and_beats_its_two_ends():
    # both dials for one budget: each width on the grid gets the largest top-p that fits the budget; the ends of
    # the search are the uniform width = budget (all k experts) and width = k x budget (about one expert a token)
    from dials import calibration_loss, expert_flops_fraction, fit_width_top_p, largest_route_top_p, make_policy
    model, batches = sharp_router(tiny(moe_stride=1)), calib()
    xs = [x for x, _ in batches]                           # what the fit meets its budget on: all of them
    w, p = fit_width_top_p(model, batches, 0.4)
    assert 0.4 <= w <= 0.8 and (p is None or 0 < p < 1)
    assert expert_flops_fraction(model, w, xs, route_top_p=p) <= 0.4 * 1.01                  # meets the budget
    if p is not None:   # and is the largest such p: a hair more routes some token to a second expert
        assert expert_flops_fraction(model, w, xs, route_top_p=min(p + 2 ** -13, 1.0)) > 0.4 * 1.01
    best = calibration_loss(model, batches, w, route_top_p=p)
    assert best <= calibration_loss(model, batches, 0.4) + 1e-12                         # width = budget, all k
    p8 = largest_route_top_p(model, 0.8, xs, 0.4 * 1.01)                                # width = 2 x budget
    assert expert_flops_fraction(model, 0.8, xs, route_top_p=1e-6) == pytest.approx(0.4, rel=0.01)   # one expert: 0.4
    assert best <= calibration_loss(model, batches, 0.8, route_top_p=p8) + 1e-12
    assert make_policy(model, "width_top_p", budget=0.4, batches=batches) == (w, p)      # make_policy's way in
    assert model.training                                  # fitted in eval mode, handed back in training mode
    with pytest.raises(ValueError, match="below what w_min=0.25 allows with one expert per token"):
        fit_width_top_p(model, batches, 0.1)                                             # 0.25 x 1 / 2 > 0.1
    with pytest.raises(ValueError, match="policy 'width_top_p' fits a FLOPs budget"):
        make_policy(model, "width_top_p", batches=batches)


def test_width_top_p_at_k_1_per_layer_k_and_dense():
    from dials import expert_flops_fraction, fit_width_top_p
    model, batches = sharp_router(tiny(moe_stride=1)), calib()
    xs = [x for x, _ in batches]                           # what the fit meets its budget on: all of them
    # k = 1: top-p has nothing to drop, so the answer is the widest uniform width within the budget, also when
    # the budget falls between two grid points (0.33: width 0.3 here, which spends 0.3)
    assert fit_width_top_p(model, batches, 0.33, k_exp=1) == (0.3, None)
    # one k per MoE layer (1 and 2): one expert per token spends 2 / 3 of all k, so widths up to 0.6 / (2 / 3) = 0.9
    # are candidates at budget 0.6; the pick meets the budget
    w, p = fit_width_top_p(model, batches, 0.6, k_exp=[1, 2])
    assert 0.6 <= w <= 0.9 and expert_flops_fraction(model, w, xs, k_exp=[1, 2], route_top_p=p) <= 0.6 * 1.01
    with pytest.raises(ValueError, match="width_top_p is a dial of MoE models; this model is dense"):
        fit_width_top_p(tiny(n_exp=0), batches, 0.5)


def test_calibration_text_comes_from_the_training_split(tmp_path):
    import numpy as np
    from dials import calibration_batches
    np.full(1000, 7, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.full(1000, 9, dtype=np.uint16).tofile(tmp_path / "val.bin")
    a = calibration_batches(str(tmp_path), 16, 3, 2, seed=5)
    assert len(a) == 3 and all(x.shape == y.shape == (2, 16) and (x == 7).all() and (y == 7).all() for x, y in a)
    b = calibration_batches(str(tmp_path), 16, 3, 2, seed=5)
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, b))              # a fixed seed: the same text
    arr = np.arange(1000, dtype=np.uint16)
    arr.tofile(tmp_path / "train.bin")
    for x, y in calibration_batches(str(tmp_path), 16, 3, 2, holdout_tokens=500):
        assert torch.equal(x[:, 1:], y[:, :-1]) and y.max() < 500                  # next tokens; tail held out
    with pytest.raises(ValueError, match="beyond the model's vocabulary"):
        calibration_batches(str(tmp_path), 16, 3, 2, vocab_size=65)
    with pytest.raises(ValueError, match="no .*nowhere/train.bin"):
        calibration_batches(str(tmp_path / "nowhere"), 16, 3, 2)


@pytest.mark.parametrize("size", ["small", "standard", "medium"])
def test_owt_width_grid_and_multiple_are_consistent(size, monkeypatch):
    # every width of the config's grid from w_min to 1 gets its own hidden size, within half a multiple of
    # w x expert_hidden (no grid step merged or moved by more than rounding to the multiple allows)
    from model import hidden_units
    import os
    monkeypatch.chdir(os.path.dirname(os.path.abspath(__file__)))
    v = {}
    exec(f"exec(open('config/train_owt_mose_{size}.py').read())", {}, v)
    H, m, grid = v["expert_hidden"], v["width_multiple"], v["width_grid"]
    ws = [v["w_min"] + i * grid for i in range(int(round((1 - v["w_min"]) / grid)) + 1)]
    h_of = [hidden_units(w, H, m) for w in ws]
    assert len(set(h_of)) == len(ws) and h_of[-1] == H
    assert all(abs(h - w * H) <= m / 2 + 1e-6 for w, h in zip(ws, h_of))
    assert max(abs(h - w * H) for w, h in zip(ws, h_of)) / H < 0.005
    assert H % m == 0 and m % 16 == 0                          # tensor-core aligned


@pytest.mark.parametrize("policy", ["search", "allocate"])
def test_sample_fits_search_and_allocate_on_training_text(two_layer_ckpt, policy):
    import re
    p = script("sample.py", f"--out_dir={two_layer_ckpt[0]}", "--num_samples=1", "--max_new_tokens=24",
               f"--policy={policy}", "--budget=0.5", "--ttt_batches=4")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fitted to budget 0.5 on 4 x 6 training windows" in p.stdout
    experts = float(re.search(r"experts ([\d.]+) %", p.stdout)[1])
    if policy == "allocate":   # a uniform width per layer: the budget holds exactly on any text
        assert "widths per MoE layer [" in p.stdout and 50 - 2.5 <= experts <= 50
    else:                      # fitted on calibration text, spent on the model's own samples
        assert "ConfidenceWidth(gamma=" in p.stdout and abs(experts / 50 - 1) < 0.1
    q = script("sample.py", f"--out_dir={two_layer_ckpt[0]}", f"--policy={policy}")
    assert q.returncode != 0 and len(q.stderr.strip().splitlines()) == 1
    assert f"policy '{policy}'" in q.stderr and "for a FLOPs budget: pass --budget in (0, 1]" in q.stderr


def test_sample_fits_width_and_top_p_together(two_layer_ckpt):
    import re
    p = script("sample.py", f"--out_dir={two_layer_ckpt[0]}", "--num_samples=1", "--max_new_tokens=24",
               "--policy=width_top_p", "--budget=0.4", "--ttt_batches=4")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fitted to budget 0.4 on 4 x 6 training windows" in p.stdout
    width = float(re.search(r"policy width_top_p, width ([\d.]+)", p.stdout)[1])
    assert 0.4 <= width <= 0.8
    if width > 0.4 + 1e-9:   # wider than the budget: top-p routing pays for it
        assert re.search(r"top-p routing 0\.\d+", p.stdout)
    experts = float(re.search(r"experts ([\d.]+) %", p.stdout)[1])
    assert experts <= 40 * 1.3   # fitted on calibration text, spent on the model's own samples
    q = script("sample.py", f"--out_dir={two_layer_ckpt[0]}", "--policy=width_top_p", "--budget=0.4",
               "--route_top_p=0.5")
    assert q.returncode != 0 and len(q.stderr.strip().splitlines()) == 1
    assert "fits route_top_p to the budget itself: drop --route_top_p" in q.stderr


def test_width_ladder_one_width_per_hidden_size_down_to_w_min():
    # the ladder that allocate_budget and fit_width_top_p both step through
    from dials import width_ladder
    from model import hidden_units
    cfg = GPTConfig(n_embd=64, n_head=4, expert_hidden=256, width_multiple=1)
    assert width_ladder(cfg, 0.25, 0.25) == [1.0, 0.75, 0.5, 0.25]
    assert width_ladder(cfg, 0.3, 0.3) == [1.0, 0.7, 0.4, 0.3]              # w_min off the grid is still reached
    assert len(width_ladder(cfg, 0.25, 0.05)) == 16                         # 1.0, 0.95, ..., 0.25
    # width_multiple 64: 1.0, 0.95 and 0.9 all give 256 units, 0.85 gives 192; each size once, named by its widest
    cfg64 = GPTConfig(n_embd=64, n_head=4, expert_hidden=256, width_multiple=64)
    ladder = width_ladder(cfg64, 0.25, 0.05)
    assert ladder == [1.0, 0.85, 0.6, 0.35]
    assert [hidden_units(w, 256, 64) for w in ladder] == [256, 192, 128, 64]
