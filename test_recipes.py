"""Tests of recipes.py, the training recipes: each recipe draws what its header and docstrings say (the widths
and their mix, k and its law), from the generator it is given, and a Recipe refuses keys that make no recipe.
train.py runs them end to end in test_train.py and test_compute.py."""

import ast
import functools
import math
import os
import re
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import recipes
from model import GPT, GPTConfig
from recipes import (K_SAMPLING, WIDTH_SAMPLING, RandomWidth, Recipe, describe, distill_loss, draw_step_width, k_of,
                     sample_k, sample_widths, width_of)

REPO = os.path.dirname(os.path.abspath(__file__))
MODEL = GPTConfig(n_layer=3, n_head=2, n_embd=32, n_exp=4, k_exp=2, moe_stride=1, expert_hidden=64, block_size=32,
                  vocab_size=65)   # 3 MoE layers
TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=32, n_exp=4, k_exp=2, expert_hidden=64, block_size=32, vocab_size=65)


@functools.cache
def train_py_defaults():
    """train.py's own defaults for the recipe keys, read from its source (it is a script, not a module)."""
    tree = ast.parse(open(os.path.join(REPO, "train.py")).read())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def recipe(*changes, model=MODEL, **keys):
    """A Recipe of train.py's defaults with `changes` (dicts) and `keys` changed, for `model`."""
    return Recipe.of(dict(train_py_defaults(), **{k: v for c in changes for k, v in c.items()}, **keys), model)


SNAPPED = dict(width_mix=(), p_sequence=0.0)   # no stated law: the full width with p_full, else uniform snapped


def frequencies(values):
    return {v: sum(x == v for x in values) / len(values) for v in set(values)}


# --- the file's header and its fields ----------------------------------------------------------------------

def test_the_header_lists_every_recipe_with_its_cost_and_every_k_variant():
    doc = recipes.__doc__
    for name in WIDTH_SAMPLING:   # "  random_pair   1 pass   ..."
        assert re.search(rf"^  {name} +(1 pass|1 \+ n|2 \+ n|len) ", doc, re.M), name
    for name in K_SAMPLING[1:]:
        assert re.search(rf"^  {name} +\S", doc, re.M), name
    assert "Router.coactivation_sample" in doc   # where Elastic MoE's pool is drawn


def test_a_recipes_keys_are_train_py_config_keys():
    defaults = train_py_defaults()
    keys = {f.name for f in fields(Recipe)} - {"n_exp", "k_exp", "n_moe_layers"}   # the model fixes those
    assert keys <= set(defaults), keys - set(defaults)
    r = recipe()
    assert (r.width_sampling, r.k_max, r.n_moe_layers) == ("random_pair", MODEL.k_exp, 3)   # k_max 0 = k_exp


# --- the RandomWidth training policy ---------------------------------------------------------------------

def test_random_width_samples_full_width_with_p_full_else_the_grid():
    gates = torch.full((20000, 2), 0.5)
    w = RandomWidth(p_full=0.5, w_min=0.25, grid=0.25, generator=torch.Generator().manual_seed(0))(gates, 0)
    assert w.shape == gates.shape
    assert set(w.unique().tolist()) == {0.25, 0.5, 0.75, 1.0}
    # P(full) = p_full + (1 - p_full) * P(U[0.25, 1] snaps to 1.0) = 0.5 + 0.5 / 6; the rest: 1/6, 1/3, 1/3
    assert abs((w == 1.0).float().mean().item() - (0.5 + 0.5 / 6)) < 0.01
    assert abs((w == 0.25).float().mean().item() - 0.5 / 6) < 0.01
    assert abs((w == 0.5).float().mean().item() - 0.5 / 3) < 0.01
    # mean width 0.5 * 1 + 0.5 * 0.625: such a pass spends 0.8125 of the full-width expert FLOPs
    assert abs(w.mean().item() - 0.8125) < 0.005


@pytest.mark.parametrize("p_full,w_min,grid", [(0.25, 0.25, 0.25), (0.5, 0.3, 0.25), (0.0, 0.25, 0.05), (0.1, 1.0, 0.25)])
def test_random_width_mix_is_what_it_draws(p_full, w_min, grid):
    # the stated mix (RandomWidth.mix, printed by train.py) against 200,000 draws; the shipped recipe's defaults
    # draw 1 / 0.75 / 0.5 / 0.25 with 37.5 / 25 / 25 / 12.5 %: snapping halves the end points' share
    policy = RandomWidth(p_full, w_min, grid, torch.Generator().manual_seed(0))
    mix = policy.mix()
    assert math.isclose(sum(mix.values()), 1.0)
    w = policy(torch.zeros(100000, 2), 0)
    drawn = {round(v, 6): (w == v).float().mean().item() for v in w.unique().tolist()}
    assert set(drawn) == {round(v, 6) for v in mix}
    assert all(abs(drawn[round(v, 6)] - p) < 0.005 for v, p in mix.items())
    if (p_full, w_min, grid) == (0.25, 0.25, 0.25):
        assert mix == {1.0: 0.375, 0.75: 0.25, 0.5: 0.25, 0.25: 0.125}
        assert RandomWidth().mix() == mix                     # RandomWidth's defaults are the shipped recipe's


def test_random_width_is_continuous_without_a_grid_and_reproducible():
    gates = torch.full((5000, 2), 0.5)
    a = RandomWidth(0.0, 0.3, 0.0, torch.Generator().manual_seed(3))(gates, 0)
    b = RandomWidth(0.0, 0.3, 0.0, torch.Generator().manual_seed(3))(gates, 0)
    assert torch.equal(a, b)                                  # the generator's state is the whole story
    assert a.min() >= 0.3 and a.max() <= 1.0 and a.unique().numel() > 4000
    assert RandomWidth(1.0, 0.3, 0.0, torch.Generator())(gates, 0).eq(1.0).all()
    assert RandomWidth(0.0, 0.3, 0.0).mix() is None
    with pytest.raises(ValueError, match="w_min must be in"):
        RandomWidth(0.5, 0.0)


def test_random_width_forward_spends_what_its_widths_say():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_CONFIG, moe_stride=1))
    x = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(1))
    policy = RandomWidth(0.5, 0.25, 0.25, torch.Generator().manual_seed(5))
    out = model(x, x, width=policy)
    # replay the same draws: both MoE layers, in order, one (N, k) draw each
    replay = RandomWidth(0.5, 0.25, 0.25, torch.Generator().manual_seed(5))
    h = sum(64 * replay(torch.zeros(96, 2), i) for i in range(2))                # (N, k) hidden units summed
    assert math.isclose(out.stats["expert_flops"].item(), (4 * 32 * h.sum(dim=1)).mean().item(), rel_tol=1e-6)
    assert out.stats["expert_flops"] < model.flops_breakdown()["experts"]


def test_bench_speed_times_the_shipped_recipe():
    # bench_speed.py's SHIPPED = dict(...): the law it times is train.py's default one
    tree = ast.parse(open(os.path.join(REPO, "bench_speed.py")).read())
    timed = {k.arg: ast.literal_eval(k.value) for n in tree.body if isinstance(n, ast.Assign)
             and getattr(n.targets[0], "id", "") == "SHIPPED" for k in n.value.keywords}
    assert timed == {k: train_py_defaults()[k] for k in ("width_mix", "p_sequence")}


def test_describe_says_what_random_pair_draws():
    assert describe(recipe()) == ("random_pair: each (token, expert) pair draws its width, 1 with probability "   # shipped
                                  "0.250, 0.75 with probability 0.250, 0.5 with probability 0.250, 0.25 with "
                                  "probability 0.250; a share of 0.5 of the sequences draws one width (by the same "
                                  "law) for all its pairs in every MoE layer")
    assert describe(recipe(SNAPPED)) == ("random_pair: each (token, expert) pair draws its width, 1 with probability "
                                           "0.375, 0.75 with probability 0.250, 0.5 with probability 0.250, 0.25 "
                                           "with probability 0.125")
    assert describe(recipe(SNAPPED, width_grid=0.0)).endswith("1 with probability 0.25, else uniform in [0.25, 1]")
    assert describe(recipe(width_sampling="max_random")) is None


# --- width_mix: a stated law; p_sequence: one width for a whole sequence -------------------------------------

TILTED = (0.3, 0.1, 0.2, 0.4)   # 1 / 0.75 / 0.5 / 0.25, tilted toward the narrowest


def assert_frequencies(drawn, law, n):
    """Each width's share of n draws within 4 standard errors of its probability; nothing drawn outside the law."""
    drawn = {round(float(w), 6): f for w, f in drawn.items()}
    law = {round(float(w), 6): p for w, p in law.items() if p > 0}
    assert set(drawn) == set(law), (drawn, law)
    for w, p in law.items():
        assert abs(drawn[w] - p) <= 4 * math.sqrt(p * (1 - p) / n), (w, drawn[w], p, n)


def shares(widths):
    """{width: share} of a tensor of widths."""
    values, counts = widths.flatten().unique(return_counts=True)
    return dict(zip(values.tolist(), (counts / widths.numel()).tolist()))


@pytest.mark.parametrize("width_mix,w_min,grid", [(TILTED, 0.25, 0.25), ((0.0, 0.5, 0.0, 0.5), 0.3, 0.25),
                                                  ((0.1, 0.2, 0.05, 0.15, 0.1, 0.1, 0.3), 0.25, 0.125)])
def test_width_mix_pairs_draw_the_stated_mix(width_mix, w_min, grid):
    policy = RandomWidth(0.9, w_min, grid, torch.Generator().manual_seed(0), width_mix=width_mix)   # p_full unused
    mix = policy.mix()
    assert list(mix.values()) == [p for p in width_mix if p > 0] and list(mix) == sorted(mix, reverse=True)
    w = policy(torch.zeros(100_000, 2), 0)                     # 200,000 (token, expert) pairs
    assert w.dtype == torch.float32 and w.shape == (100_000, 2)
    assert_frequencies(shares(w), mix, w.numel())
    if w_min == 0.3:   # grid_widths: 1, the multiples of the grid above w_min, and w_min itself
        assert recipes.grid_widths(w_min, grid) == (1.0, 0.75, 0.5, 0.3) and set(mix) == {0.75, 0.3}


def test_width_mix_is_the_law_of_every_random_width():
    # a pass's width (max_random, sandwich, random_step, width_per_layer) is drawn by the same stated law
    r, gen, n = recipe(width_mix=TILTED), torch.Generator().manual_seed(0), 20_000
    assert_frequencies(frequencies([draw_step_width(r, gen) for _ in range(n)]), dict(zip((1, .75, .5, .25), TILTED)),
                       n)
    r = recipe(width_sampling="random_step", width_mix=TILTED, p_full=0.9)   # the mix's first entry, not p_full
    assert_frequencies(frequencies([sample_widths(r, gen)[0] for _ in range(n)]), dict(zip((1, .75, .5, .25), TILTED)),
                       n)
    step = sample_widths(recipe(width_sampling="max_random", width_mix=(0, 0, 1, 0), n_random_widths=3), gen)
    assert step == [1.0, 0.5, 0.5, 0.5] and all(type(w) is float for w in step)
    r = recipe(width_mix=(1 / 16,) * 16, width_grid=0.05)        # a step's widths are the grid's floats
    assert {draw_step_width(r, gen) for _ in range(500)} == set(recipes.grid_widths(0.25, 0.05))
    assert recipes.grid_widths(0.25, 0.05)[-3:] == (0.35, 0.3, 0.25)


def test_describe_and_repr_state_the_mix_and_p_sequence():
    r = recipe(width_mix=TILTED, p_sequence=0.5)
    assert describe(r) == ("random_pair: each (token, expert) pair draws its width, 1 with probability 0.300, 0.75 "
                           "with probability 0.100, 0.5 with probability 0.200, 0.25 with probability 0.400; a share "
                           "of 0.5 of the sequences draws one width (by the same law) for all its pairs in every MoE "
                           "layer")
    pair = sample_widths(r, torch.Generator())[0]
    assert repr(pair) == "RandomWidth(width_mix=(0.3, 0.1, 0.2, 0.4), w_min=0.25, grid=0.25, p_sequence=0.5)"
    assert repr(width_of(r, pair, 3, 1, 32)) == repr(pair) and width_of(r, pair, 3, 1, 32).seq_len == 32


def widths_each_layer_ran(policy, B=64, T=32):
    """Forward a tiny GPT (3 MoE layers) on B sequences of T tokens: the width every (token, expert) pair ran in
    every MoE layer, (layers, B, T, k), as the model reports it (h/H, exact for these widths at H = 64)."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    x = torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.stack(model(x, x, width=policy).stats["ran_width"])


def test_p_sequence_one_gives_every_sequence_one_width_in_all_pairs_and_layers():
    r = recipe(width_mix=TILTED, p_sequence=1.0)
    policy = width_of(r, sample_widths(r, torch.Generator())[0], step=5, micro_batch=2, seq_len=32)
    ran = widths_each_layer_ran(policy)                                       # (3, 64, 32, 2)
    per_sequence = ran.permute(1, 0, 2, 3).flatten(1)                         # (64, 3 * 32 * 2)
    assert (per_sequence == per_sequence[:, :1]).all()                        # one width per sequence, every layer
    assert len(per_sequence[:, 0].unique()) > 1                               # not one width for the whole batch
    # the same step and micro-batch draw the same (a resumed run, another rank); another micro-batch, others
    again = widths_each_layer_ran(width_of(r, sample_widths(r, torch.Generator())[0], 5, 2, 32))
    other = widths_each_layer_ran(width_of(r, sample_widths(r, torch.Generator())[0], 5, 3, 32))
    assert torch.equal(ran, again) and not torch.equal(ran, other)


def test_p_sequence_half_gives_about_half_the_sequences_one_width():
    r = recipe(width_mix=TILTED, p_sequence=0.5)
    ran = widths_each_layer_ran(width_of(r, sample_widths(r, torch.Generator())[0], 0, 0, 32), B=64)
    per_sequence = ran.permute(1, 0, 2, 3).flatten(1)                         # (64, 192)
    uniform = (per_sequence == per_sequence[:, :1]).all(dim=1).float().mean().item()
    assert abs(uniform - 0.5) <= 4 * math.sqrt(0.25 / 64), uniform   # per-pair sequences: never one width by chance


@pytest.mark.parametrize("width_mix,p_sequence", [(TILTED, 0.5), ((), 0.3)])
def test_p_sequence_draws_the_sequences_share_and_widths_by_the_mix(width_mix, p_sequence):
    # 20,000 sequences of 4 tokens, 2 pairs each, in 3 MoE layers: the share of one-width sequences is p_sequence,
    # their widths follow the stated mix (the default law's too), and the other pairs keep it as well
    S, T, L = 20_000, 4, 3
    policy = RandomWidth(0.25, 0.25, 0.25, torch.Generator().manual_seed(0), width_mix, p_sequence, seq_len=T)
    w = torch.stack([policy(torch.zeros(S * T, 2), i) for i in range(L)]).view(L, S, T * 2)
    per_sequence = w.permute(1, 0, 2).flatten(1)                              # (S, L * T * 2)
    one = (per_sequence == per_sequence[:, :1]).all(dim=1)
    assert abs(one.float().mean().item() - p_sequence) <= 4 * math.sqrt(p_sequence * (1 - p_sequence) / S)
    assert_frequencies(shares(per_sequence[one, 0]), policy.mix(), int(one.sum()))
    assert_frequencies(shares(per_sequence[~one]), policy.mix(), per_sequence[~one].numel())
    # a new pass (its first MoE layer again) draws new sequences; the layers after it keep them
    again = policy(torch.zeros(S * T, 2), 0).view(S, T * 2)
    assert not torch.equal(again[:, 0], w[0, :, 0])


def old_random_width_call(p_full, w_min, grid, generator, gates):
    """RandomWidth.__call__ as it was before width_mix and p_sequence (the shipped recipe's draws)."""
    u = torch.rand((2, *gates.shape), generator=generator)
    w = w_min + (1 - w_min) * u[1]
    if grid:
        w = (torch.round(w / grid) * grid).clamp(w_min, 1.0)
    return torch.where(u[0] < p_full, 1.0, w).to(gates.device)


def old_draw_step_width(recipe, gen):
    u = recipe.w_min + (1 - recipe.w_min) * torch.rand((), generator=gen).item()
    if not recipe.width_grid:
        return u
    return min(1.0, max(recipe.w_min, round(u / recipe.width_grid) * recipe.width_grid))


@pytest.mark.parametrize("keys", [dict(SNAPPED, p_full=0.5, width_grid=0.0), dict(SNAPPED, w_min=0.3, width_grid=0.0)])
def test_continuous_widths_draw_exactly_what_they_drew_before(keys):
    # off the grid there are no shares to keep (every width differs): each pair draws alone, as before width_mix,
    # p_sequence and the exact shares, the same numbers from the same generator and no more of them
    r = recipe(**keys)
    assert (r.width_mix, r.p_sequence) == ((), 0.0)
    pair = sample_widths(r, torch.Generator())[0]
    policy = width_of(r, pair, step=7, micro_batch=3, seq_len=32)
    old = torch.Generator().manual_seed(r.seed + 1_000_003 * 7 + 3)
    for layer in range(3):
        gates = torch.rand(256, 2)
        assert torch.equal(policy(gates, layer), old_random_width_call(r.p_full, r.w_min, r.width_grid, old, gates))
    assert torch.equal(policy.generator.get_state(), old.get_state())
    new, old = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert [draw_step_width(r, new) for _ in range(200)] == [old_draw_step_width(r, old) for _ in range(200)]
    r = recipe(width_sampling="random_step", **keys)
    assert [sample_widths(r, new) for _ in range(200)] == \
        [[1.0 if torch.rand((), generator=old).item() < r.p_full else old_draw_step_width(r, old)] for _ in range(200)]
    assert torch.equal(new.get_state(), old.get_state())


@pytest.mark.parametrize("keys", [{}, SNAPPED, dict(SNAPPED, w_min=0.3, width_grid=0.05),
                                  dict(width_mix=(0.3, 0.1, 0.2, 0.4), p_sequence=0.0), dict(width_mix=(), p_sequence=0.5),
                                  dict(width_mix=(0.5, 0.0, 0.25, 0.25), p_sequence=0.3)])
def test_grid_widths_come_in_the_mixs_exact_shares_every_pass(keys):
    # every layer of every pass runs floor or ceil of n p of its n pairs at each width p (so the tensors keep their
    # sizes from step to step, give or take a row), in places that change from layer to layer and pass to pass;
    # p_sequence: floor or ceil of p_sequence S of the S sequences run one width, their widths in exact shares too
    r = recipe(**keys)
    mix = RandomWidth(r.p_full, r.w_min, r.width_grid, width_mix=r.width_mix).mix()
    T, k, S, seen = 32, 2, 8, set()
    for step in range(6):
        policy = width_of(r, sample_widths(r, torch.Generator())[0], step=step, micro_batch=0, seq_len=T)
        for layer in range(2):
            w = policy(torch.zeros(S * T, k), layer)
            c = {x: int((w == x).sum()) for x in mix}
            assert sum(c.values()) == w.numel(), (c, mix)
            slack = T * k + 1 if r.p_sequence else 1   # a sequence's pairs: S p need not be whole
            assert all(abs(c[x] - p * w.numel()) < slack for x, p in mix.items()), (c, mix)
            seen.add(tuple(w.flatten().tolist()))
            if r.p_sequence:
                one, width = policy.sequences
                assert abs(int(one.sum()) - r.p_sequence * S) < 1
                assert all(abs(int((width == x).sum()) - p * len(width)) < 1 for x, p in mix.items())
                assert torch.equal(w.view(S, T * k)[one], width[:, None].expand(-1, T * k))
    assert len(seen) == 12


def test_p_sequence_needs_the_sequence_length():
    policy = RandomWidth(p_sequence=0.5, generator=torch.Generator())
    with pytest.raises(ValueError, match="p_sequence needs the length of the sequences"):
        policy(torch.zeros(64, 2), 0)
    with pytest.raises(ValueError, match="p_sequence needs the length"):
        RandomWidth(p_sequence=0.5, seq_len=5, generator=torch.Generator())(torch.zeros(64, 2), 0)


# --- one width for a whole pass, and the widths of a step -------------------------------------------------------

@pytest.mark.parametrize("w_min,grid", [(0.25, 0.25), (0.3, 0.25), (0.25, 0.05)])
def test_draw_step_width_is_uniform_snapped_as_random_widths_mix_says(w_min, grid):
    # a pass's width is snapped by the same rule as a pair's: RandomWidth's mix at p_full = 0 is its law
    r, gen = recipe(SNAPPED, w_min=w_min, width_grid=grid), torch.Generator().manual_seed(0)
    drawn = frequencies([round(draw_step_width(r, gen), 6) for _ in range(20000)])
    mix = {round(w, 6): p for w, p in RandomWidth(0.0, w_min, grid).mix().items()}
    assert set(drawn) == set(mix) and all(abs(drawn[w] - p) < 0.015 for w, p in mix.items()), (drawn, mix)


def test_draw_step_width_is_continuous_without_a_grid():
    r, gen = recipe(SNAPPED, w_min=0.3, width_grid=0.0), torch.Generator().manual_seed(0)
    drawn = [draw_step_width(r, gen) for _ in range(2000)]
    assert min(drawn) >= 0.3 and max(drawn) <= 1.0 and len(set(drawn)) == 2000
    assert abs(sum(drawn) / 2000 - 0.65) < 0.02


@pytest.mark.parametrize("keys,check", [
    (dict(width_sampling="none"), lambda w: w == [1.0]),
    (dict(width_sampling="random_pair"), lambda w: len(w) == 1 and isinstance(w[0], RandomWidth)),
    (dict(width_sampling="random_pair", distill_weight=0.5),   # the teacher comes first
     lambda w: w[0] == 1.0 and isinstance(w[1], RandomWidth) and len(w) == 2),
    (dict(width_sampling="max_random", n_random_widths=2),
     lambda w: len(w) == 3 and w[0] == 1.0 and all(x in (0.25, 0.5, 0.75, 1.0) for x in w[1:])),
    (dict(width_sampling="sandwich", w_min=0.3), lambda w: w[:2] == [1.0, 0.3] and 0.3 <= w[2] <= 1.0),
    (dict(width_sampling="fixed", fixed_widths=(0.5, 1.0, 0.75)), lambda w: w == [1.0, 0.75, 0.5]),
    (dict(width_sampling="max_random", width_per_layer=True),   # one random width per MoE layer
     lambda w: w[0] == 1.0 and isinstance(w[1], list) and len(w[1]) == 3),
])
def test_sample_widths_gives_each_recipes_passes_widest_first(keys, check):
    r, gen = recipe(**keys), torch.Generator().manual_seed(0)
    for _ in range(20):
        assert check(sample_widths(r, gen))


@pytest.mark.parametrize("p_full", [0.25, 0.5])
def test_random_step_draws_the_full_width_with_p_full_else_the_grid(p_full):
    # one width per step with the law of one RandomWidth pair: the stated mix
    r, gen = recipe(SNAPPED, width_sampling="random_step", p_full=p_full), torch.Generator().manual_seed(0)
    drawn = frequencies([sample_widths(r, gen)[0] for _ in range(10000)])
    mix = RandomWidth(p_full, 0.25, 0.25).mix()
    assert set(drawn) == set(mix) and all(abs(drawn[w] - p) < 0.02 for w, p in mix.items()), (drawn, mix)


def test_width_of_gives_each_micro_batch_its_own_reproducible_draws():
    r, pair = recipe(seed=7), RandomWidth(0.25, 0.25, 0.25)
    assert width_of(r, 0.5, 3, 1) == 0.5 and width_of(r, [1.0, 0.5, 0.5], 3, 1) == [1.0, 0.5, 0.5]
    draw = lambda step, mb: width_of(r, pair, step, mb)(torch.zeros(500, 2), 0)
    assert torch.equal(draw(3, 1), draw(3, 1))   # a resumed run, or another rank, draws the same
    assert not torch.equal(draw(3, 1), draw(3, 2)) and not torch.equal(draw(3, 1), draw(4, 1))
    assert repr(width_of(r, pair, 3, 1)) == repr(pair)


def test_distill_loss_is_cross_entropy_against_the_teachers_predictions():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(4, 5, 11, generator=g), torch.randn(4, 5, 11, generator=g)
    soft = F.cross_entropy(logits.reshape(-1, 11), F.softmax(teacher, -1).reshape(-1, 11))
    torch.testing.assert_close(distill_loss(logits, teacher), soft)
    p = F.softmax(teacher, -1)   # at the teacher's own logits: the entropy of its predictions, the minimum
    torch.testing.assert_close(distill_loss(teacher, teacher), -(p * p.log()).sum(-1).mean())
    assert distill_loss(logits, teacher) > distill_loss(teacher, teacher)


# --- experts per token (Matryoshka MoE) ----------------------------------------------------------------------

def test_sample_k_variants():
    gen = torch.Generator().manual_seed(0)
    r = recipe(k_sampling="layer", k_max=3)
    layer = [sample_k(r, gen, 2) for _ in range(3000)]
    assert all(len(ks) == 3 for ks in layer)
    drawn = frequencies([k for ks in layer for k in ks])
    assert set(drawn) == {1, 2, 3} and all(abs(p - 1 / 3) < 0.02 for p in drawn.values())   # U{k_min..k_max}
    r = recipe(k_sampling="step", k_min=2, k_max=4)
    step = [sample_k(r, gen, 2) for _ in range(100)]
    assert all(isinstance(k, int) and 2 <= k <= 4 for k in step) and len(set(step)) == 3
    micro = sample_k(recipe(k_sampling="micro", k_max=4), gen, 6)
    assert len(micro) == 6 and [k_of(recipe(k_sampling="micro"), micro, m) for m in range(6)] == micro
    assert sample_k(recipe(k_sampling="top_p", k_max=3), gen, 2) == 3   # the most a token may take
    assert sample_k(recipe(), gen, 2) is None                            # the training k
    assert k_of(recipe(k_sampling="layer"), [1, 2, 3], 5) == [1, 2, 3]   # the same k for every micro-batch


@pytest.mark.parametrize("k_tau", [1.0, 2.0])
def test_capacity_draws_k_with_probability_proportional_to_k_to_the_one_over_tau(k_tau):
    r, gen = recipe(k_sampling="capacity", k_max=4, k_tau=k_tau), torch.Generator().manual_seed(0)
    drawn = frequencies([k for _ in range(5000) for k in sample_k(r, gen, 1)])
    weight = {k: k ** (1 / k_tau) for k in range(1, 5)}
    law = {k: w / sum(weight.values()) for k, w in weight.items()}
    assert all(abs(drawn[k] - p) < 0.015 for k, p in law.items()), (drawn, law)


# --- keys that make no recipe ------------------------------------------------------------------------------

@pytest.mark.parametrize("keys,message", [
    (dict(p_full=1.5), "--p_full must be a probability in [0, 1], got 1.5"),
    (dict(k_tau=0.0), "--k_tau must be > 0, got 0.0"),
    (dict(width_sampling="random"), "width_sampling must be one of random_pair, max_random"),
    (dict(width_data="new"), "width_data must be same or fresh"),
    (dict(width_data="fresh", distill_weight=0.5), "in-place distillation needs every width on the same batch"),
    (dict(k_sampling="top_p", k_min=2), "leave k_min at 1 and k_pool at 0"),
    (dict(detach_router=True), "width_sampling='random_pair' has one pass"),
    (dict(width_sampling="fixed", fixed_widths=()), "give at least one"),
    (dict(fixed_widths=(1.0, 1.5)), "fixed_widths values must be in (0, 1], got 1.5"),
    (dict(w_min=0.0), "w_min must be in (0, 1]"),
    (dict(k_min=3), "need 1 <= k_min <= k_max <= n_exp, got k_min=3, k_max=2, n_exp=4"),
    (dict(k_pool=2), "k_pool must be in (k_exp, n_exp] = (2, 4], got 2"),
    (dict(width_mix=(0.5, 0.5)), "--width_mix needs one probability per grid width, widest first: 4 for 1, 0.75, "
                                 "0.5, 0.25 (w_min=0.25, width_grid=0.25); got 2"),
    (dict(width_mix=(0.6, 0.6, 0.2, -0.4)), "--width_mix values are probabilities, each >= 0"),
    (dict(width_mix=(0.3, 0.1, 0.2, 0.5)), "--width_mix must sum to 1 (it is the law of every random width); got "
                                           "(0.3, 0.1, 0.2, 0.5), which sums to 1.1"),
    (dict(width_mix=TILTED, width_grid=0.0), "--width_mix gives each grid width a probability: set --width_grid > 0"),
    (dict(p_sequence=1.5), "--p_sequence must be a share of sequences in [0, 1], got 1.5"),
])
def test_keys_that_make_no_recipe_are_one_line(keys, message):
    with pytest.raises(ValueError) as e:
        recipe(**keys)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_p_full_on_the_command_line_with_a_width_mix_is_one_line():
    # the mix's first entry is the full width's share: a --p_full beside it would be silently unused
    with pytest.raises(ValueError) as e:
        Recipe.of(dict(train_py_defaults(), width_mix=TILTED, p_full=0.5), MODEL, given={"p_full", "width_mix"})
    assert str(e.value) == ("--p_full is unused with a width_mix: its first entry is the full width's share (drop "
                            "--p_full, or give --width_mix=())")
    assert Recipe.of(dict(train_py_defaults(), width_mix=TILTED), MODEL, given={"width_mix"}).width_mix == TILTED
    assert Recipe.of(dict(train_py_defaults(), **SNAPPED, p_full=0.5), MODEL, given={"p_full"}).p_full == 0.5   # no mix
    assert abs(sum(recipe(width_mix=(0.3, 0.1, 0.2, 0.4 - 5e-7)).width_mix) - 1) < 1e-6   # within 1e-6 of 1


def test_a_dense_gpt_trains_one_full_width_pass():
    dense = GPTConfig(**{**TINY_CONFIG, "n_exp": 0})
    r = recipe(model=dense, width_sampling="sandwich", k_sampling="layer", k_pool=3, detach_router=True)
    gen = torch.Generator().manual_seed(0)
    assert (sample_widths(r, gen), sample_k(r, gen, 1), r.k_pool, r.detach_router) == ([1.0], None, 0, False)
