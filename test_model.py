"""Tests of model.py: the dispatch against its reference, the slimmable and elastic dials, FLOPs, policies.
Run: python -m pytest -q"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from dials import expert_flops_fraction, fit_budget, fit_ttt
from test_dispatch import masked_reference
from model import GPT, ConfidenceWidth, GPTConfig, MoSELayer, Router, UniformWidth, hidden_units


def tiny(**kw):
    args = dict(block_size=64, vocab_size=65, n_layer=2, n_head=2, n_embd=64, n_exp=4, k_exp=2, dropout=0.0)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def tokens(B=3, T=32, seed=1):
    return torch.randint(0, 65, (B, T), generator=torch.Generator().manual_seed(seed))


def moe_layer(model):
    return model.transformer.h[0].mlp


# --- the dispatch against the masked reference ------------------------------------------------------------

@pytest.mark.parametrize("width", [1.0, 0.5, 0.3, "mixed"])
def test_dispatch_matches_reference_forward_and_grad(width):
    model = tiny(bias=True)
    layer = moe_layer(model)
    torch.manual_seed(2)
    with torch.no_grad():   # non-zero biases so their gradients are compared too
        layer.experts.b_fc.normal_(0, 0.1)
        layer.experts.b_proj.normal_(0, 0.1)
    x = torch.randn(40, 64)
    r = layer.router(x, 2)
    if width == "mixed":
        w = torch.rand(40, 2) * 0.9 + 0.1                                  # a different width per pair
    else:
        w = torch.full((40, 2), width)
    h = layer.experts.hidden_units(w)
    assert width != "mixed" or h.unique().numel() > 5
    results = []
    for fn in (lambda xx, g: layer.dispatch(xx, r.expert_idx, g, h),
               lambda xx, g: masked_reference(layer.experts, xx, r.expert_idx, g, h)):
        model.zero_grad()
        xx, g = x.clone().requires_grad_(), r.gates.detach().clone().requires_grad_()
        y = fn(xx, g)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xx.grad, g.grad] + [p.grad.clone() for p in layer.experts.parameters()])
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_path():
    # what cuda runs (autocast to bf16), exercised on the CPU: the router stays fp32, the dispatch still matches
    # its reference within bf16's precision, and the model's loss stays close to the fp32 one
    model = tiny()
    layer = moe_layer(model)
    x = torch.randn(40, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x, 2)
        h = layer.experts.hidden_units(torch.rand(40, 2) * 0.9 + 0.1)
        fast = layer.dispatch(x, r.expert_idx, r.gates, h)
        ref = masked_reference(layer.experts, x, r.expert_idx, r.gates, h)
        idx = tokens()
        low = model(idx, idx, width=ConfidenceWidth(2.0, 0.5))
    assert r.gates.dtype == r.probs.dtype == torch.float32 and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-3)
    assert low.loss.dtype == torch.float32
    assert abs(low.loss.item() - model(idx, idx, width=ConfidenceWidth(2.0, 0.5)).loss.item()) < 1e-2


def test_nested_prefix_equals_zeroed_tail():
    # width w == width 1 with the hidden units past h(w) zeroed: the narrow expert is the wide one's prefix
    model = tiny(bias=True)
    idx = tokens()
    for w in (0.75, 0.5, 0.3):
        h = hidden_units(w, model.config.expert_hidden)
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for block in zeroed.transformer.h:
                if hasattr(block.mlp, "experts"):
                    block.mlp.experts.c_fc[:, :, h:] = 0
                    block.mlp.experts.c_proj[:, h:, :] = 0
                    block.mlp.experts.b_fc[:, h:] = 0
        torch.testing.assert_close(model(idx, idx, width=w).logits, zeroed(idx, idx, width=1.0).logits)
        assert not torch.allclose(model(idx, idx, width=w).logits, model(idx, idx).logits)


def plain_moe(layer, x, k):
    """A standard top-k MoE written token by token, independent of the dispatch code."""
    ex = layer.experts
    probs = F.softmax(x @ layer.router.w_g.weight.T, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        p, e = probs[t].topk(k)
        p = p / p.sum()
        for j in range(k):
            out[t] += p[j] * (F.gelu(x[t] @ ex.c_fc[e[j]]) @ ex.c_proj[e[j]])
    return out


def test_full_width_training_k_is_a_plain_moe():
    model = tiny()
    layer = moe_layer(model)
    x = torch.randn(2, 10, 64)
    y, *_ = layer(x, 1.0, 2)
    torch.testing.assert_close(y.view(20, 64), plain_moe(layer, x.view(20, 64), 2), rtol=1e-4, atol=1e-5)


def test_batch_independence_and_no_dropping():
    model = tiny()
    idx = tokens(B=4)
    for width in (1.0, 0.4, ConfidenceWidth(2.0, 0.5)):
        batched = model(idx, idx, width=width).logits
        for b in range(4):
            alone = model(idx[b:b + 1], idx[b:b + 1], width=width).logits
            torch.testing.assert_close(alone[0], batched[b], rtol=1e-5, atol=1e-5)


def test_causality():
    model = tiny()
    idx = tokens(B=1)
    changed = idx.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 65
    a, b = model(idx, idx, width=0.5).logits, model(changed, changed, width=0.5).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_gradient_reaches_only_the_used_prefix():
    model = tiny()
    idx = tokens()
    out = model(idx, idx, width=0.5)
    (out.loss + out.router_loss).backward()
    h = hidden_units(0.5, model.config.expert_hidden)
    ex = moe_layer(model).experts
    assert ex.c_fc.grad[:, :, h:].abs().max() == 0 and ex.c_proj.grad[:, h:, :].abs().max() == 0
    assert ex.c_fc.grad[:, :, :h].abs().sum() > 0 and ex.c_proj.grad[:, :h, :].abs().sum() > 0


# --- elastic top-k and the router ---------------------------------------------------------------------------

def test_elastic_k_below_and_above_training_value():
    model = tiny(moe_stride=1)
    idx = tokens()
    losses = [model(idx, idx, k_exp=k).loss.item() for k in range(1, 5)]
    assert len(set(losses)) == 4                       # each k is a different model
    per_layer = model(idx, idx, k_exp=[1, 3], width=[0.5, 1.0]).loss   # one dial per MoE layer
    mixed = model(idx, idx, width=[0.5, ConfidenceWidth(2.0, 0.5)]).loss  # a float in one, a policy in the other
    assert torch.isfinite(mixed)
    assert torch.isfinite(per_layer) and per_layer.item() not in losses


def test_router_losses_by_hand():
    cfg = GPTConfig(n_embd=8, n_head=1, n_exp=4, k_exp=2, aux_loss_weight=1.0, z_loss_weight=0.0,
                    hr_loss_weight=0.0)
    router = Router(cfg)
    x = torch.randn(50, 8)
    r = router(x, 2)
    probs = F.softmax(x @ router.w_g.weight.T, dim=-1)
    frac = torch.stack([(r.expert_idx == e).float().sum() / 100 for e in range(4)])
    torch.testing.assert_close(r.loss, 4 * (frac * probs.mean(0)).sum())
    torch.testing.assert_close(r.probs, probs)           # the full softmax, and the gates renormalised from it
    top = probs.gather(1, r.expert_idx)
    torch.testing.assert_close(r.gates, top / top.sum(1, keepdim=True))
    with torch.no_grad():                               # token t prefers expert t: a perfectly balanced batch
        router.w_g.weight.copy_(torch.eye(4, 8))
    r = router(3 * torch.eye(4, 8), 1)
    assert r.load.tolist() == [0.25] * 4 and r.expert_idx.flatten().tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(r.loss, torch.tensor(1.0))   # the Switch loss is 1 at perfect balance
    # the hierarchical router loss is H(q) - log E, negative unless q is uniform
    cfg.aux_loss_weight, cfg.hr_loss_weight = 0.0, 1.0
    router = Router(cfg)
    x = torch.randn(50, 8)
    q = F.softmax(x @ router.w_g.weight.T, dim=-1)
    entropy = -(q * q.log()).sum(-1).mean()
    torch.testing.assert_close(router(x, 2).loss, entropy - torch.log(torch.tensor(4.0)))
    # eval mode: the same routing and load, no losses (nothing trains on them; decoding skips the work)
    train_r, eval_r = router(x, 2), router.eval()(x, 2)
    assert torch.equal(train_r.expert_idx, eval_r.expert_idx) and torch.equal(train_r.load, eval_r.load)
    assert eval_r.loss.item() == 0.0 and train_r.loss.item() != 0.0


def test_hidden_units_same_on_the_host_and_in_a_tensor():
    # a float width takes a host path (no tensor ops); it must round exactly as the tensor path does, also at
    # the halfway points (w * full / multiple = n + 0.5) where float32 and float64 rounding could differ
    for full, multiple in ((256, 1), (1536, 16), (1536, 64), (100, 8)):
        ws = [i / 400 for i in range(1, 401)] + [(n + 0.5) * multiple / full for n in range(full // multiple)]
        ws = [w for w in ws if 0 < w <= 1]
        on_host = [hidden_units(w, full, multiple) for w in ws]
        assert on_host == hidden_units(torch.tensor(ws), full, multiple).tolist()
        assert all(isinstance(h, int) for h in on_host)


def test_coactivation_sampling_draws_distinct_experts_from_the_top_pool():
    torch.manual_seed(0)
    probs = F.softmax(torch.randn(2000, 8), dim=-1)
    idx = Router.coactivation_sample(probs, 2, 4)
    top4 = probs.topk(4).indices
    assert (idx[:, 0] != idx[:, 1]).all()
    assert all((top4 == idx[:, j:j + 1]).any(1).all() for j in range(2))
    # pools of size 2 (plain top-2) happen, and so do pairs that top-2 would never pick
    is_top2 = (probs.topk(2).indices.sort(1).values == idx.sort(1).values).all(1).float().mean()
    assert 0.3 < is_top2 < 0.7


# --- FLOPs ------------------------------------------------------------------------------------------------

def test_flops_by_hand_and_monotone():
    model = tiny()
    C, V, T, H = 64, 65, 64, 256
    attention = 2 * (8 * C * C + 4 * C * (T + 1) / 2)
    dense = 1 * 16 * C * C
    router = 1 * 2 * C * 4
    experts = 2 * 4 * C * H
    assert model.flops_per_token() == attention + dense + router + experts + 2 * C * V
    assert model.flops_breakdown(0.5, 1)["experts"] == 1 * 4 * C * 128
    widths = [0.1, 0.25, 0.5, 0.75, 1.0]
    f = [model.flops_per_token(w) for w in widths]
    assert all(a < b for a, b in zip(f, f[1:]))
    f = [model.flops_per_token(0.5, k) for k in range(1, 5)]
    assert all(a < b for a, b in zip(f, f[1:]))
    # the forward's report of what it spent agrees with the analytic count for uniform widths
    out = model(tokens(), width=0.5, k_exp=3)
    assert out.stats["expert_flops"].item() == model.flops_breakdown(0.5, 3)["experts"]
    assert out.stats["flops_per_token"].item() == model.flops_per_token(0.5, 3)


def test_dense_baseline_flops_and_params():
    dense = tiny(n_exp=0)
    assert dense.flops_breakdown()["experts"] == 0 and dense.flops_breakdown()["router"] == 0
    out = dense(tokens(), tokens())
    assert out.router_loss.item() == 0 and torch.isfinite(out.loss)


# --- width policies ---------------------------------------------------------------------------------------

def test_confidence_gamma_zero_is_uniform_and_spent_flops_follow_budget():
    model = tiny()
    idx = tokens()
    for G in (0.3, 0.5, 0.8):
        conf = model(idx, idx, width=ConfidenceWidth(0.0, G))
        torch.testing.assert_close(conf.logits, model(idx, idx, width=G).logits)
        torch.testing.assert_close(conf.logits, model(idx, idx, width=UniformWidth(G)).logits)
    spent = [expert_flops_fraction(model, ConfidenceWidth(2.0, G), [idx]) for G in (0.3, 0.5, 0.7, 0.9)]
    assert all(a < b for a, b in zip(spent, spent[1:]))
    assert all(abs(s - G) < 0.1 for s, G in zip(spent, (0.3, 0.5, 0.7, 0.9)))


def test_confidence_policy_formula():
    gates = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    w = ConfidenceWidth(gamma=1.0, Gamma=0.5, w_min=0.25, grid=0.05)(gates, 0)
    torch.testing.assert_close(w, torch.tensor([[0.8, 0.25], [0.5, 0.5]]))
    w = ConfidenceWidth(gamma=20.0, Gamma=0.5)(gates, 0)    # the budget goes to the confident expert
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.25], [0.5, 0.5]]))


def test_exact_budget_within_one_percent():
    model = tiny()
    batches = [tokens(seed=s) for s in range(3)]
    for budget in (0.4, 0.6):
        policy = fit_budget(model, ConfidenceWidth(3.0, budget), batches, budget)
        assert abs(expert_flops_fraction(model, policy, batches) / budget - 1) <= 0.01


def test_exact_budget_near_full_width_on_a_confident_router():
    # a trained router is confident: the second expert's share q is tiny, so spending 95 % of the full-width
    # FLOPs takes a Gamma far above 1; a gamma so sharp that no Gamma gets there fails with the reason
    model = tiny()
    with torch.no_grad():
        moe_layer(model).router.w_g.weight.mul_(50)
    batches = [tokens(seed=s) for s in range(2)]
    for budget in (0.95, 1.0):
        policy = fit_budget(model, ConfidenceWidth(1.0, 0.5), batches, budget)
        assert abs(expert_flops_fraction(model, policy, batches) / budget - 1) <= 0.01
    with pytest.raises(ValueError, match="budget 0.99 is out of reach for gamma=50"):
        fit_budget(model, ConfidenceWidth(50.0, 0.5), batches, 0.99)


def test_snapping_never_goes_below_w_min():
    gates = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    for w_min, grid in ((0.12, 0.05), (0.25, 0.1)):
        w = ConfidenceWidth(gamma=2.0, Gamma=0.5, w_min=w_min, grid=grid)(gates, 0)
        assert w.min() >= w_min and w.max() <= 1


def test_a_policy_slices_unless_it_is_being_fitted(monkeypatch):
    # a policy runs the real, narrower experts, in grad mode too, also with a gamma that requires grad; only
    # fitting=True (dials.fit_ttt) switches the dispatch to full width with the differentiable mask
    model = tiny()
    idx = tokens()
    soft, real = [], MoSELayer.dispatch
    monkeypatch.setattr(MoSELayer, "dispatch", lambda self, *a, soft_mask=None:
                        soft.append(soft_mask is not None) or real(self, *a, soft_mask=soft_mask))
    out = model(idx, idx, width=ConfidenceWidth(2.0, 0.5))
    assert out.loss.requires_grad and soft == [False]
    model(idx, idx, width=ConfidenceWidth(torch.tensor(2.0, requires_grad=True), 0.5))
    assert soft == [False, False]
    model(idx, idx, width=ConfidenceWidth(torch.tensor(2.0, requires_grad=True), 0.5), fitting=True)
    assert soft == [False, False, True]
    model(idx, idx, width=0.5, fitting=True)   # a width for all has nothing to fit: the plain dispatch
    assert soft == [False, False, True, False]


def test_fit_ttt_takes_its_sgd_steps_in_the_fitting_mode(monkeypatch):
    # every SGD step of fit_ttt runs fitting=True (its gradient in gamma comes through the mask); its fits of
    # Gamma to the budget run the plain forward, whose spent FLOPs are the hard widths'
    model, seen, real = tiny(), [], GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, fitting=False, **kw:
                        seen.append(fitting) or real(self, *a, fitting=fitting, **kw))
    fit_ttt(model, [(tokens(seed=s), tokens(seed=s)) for s in range(3)], 0.5)
    assert seen.count(True) == 3 and seen.count(False) > 0


def test_ttt_path_loss_equals_hard_path_loss():
    model = tiny()
    idx = tokens()
    gamma = torch.tensor(1.5, requires_grad=True)
    soft = model(idx, idx, width=ConfidenceWidth(gamma, 0.5), fitting=True).loss
    hard = model(idx, idx, width=ConfidenceWidth(1.5, 0.5)).loss
    torch.testing.assert_close(soft, hard)
    soft.backward()
    assert gamma.grad is not None and gamma.grad != 0


def test_ttt_meets_budget_on_held_out_text():
    model = tiny()
    train = [(tokens(seed=s), tokens(seed=s)) for s in range(12)]
    held_out = [tokens(seed=100 + s) for s in range(3)]
    for per_layer in (False, True):
        policy = fit_ttt(model, train, 0.5, lr=0.05, per_layer=per_layer, refit_every=5)
        assert abs(expert_flops_fraction(model, policy, held_out) / 0.5 - 1) <= 0.05
        assert isinstance(policy.gamma, torch.Tensor) == per_layer
    assert all(p.requires_grad for p in model.parameters())   # the model is handed back trainable
    model.transformer.wte.weight.requires_grad_(False)         # ... and what the caller froze stays frozen
    fit_ttt(model, train[:2], 0.5)
    assert not model.transformer.wte.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "transformer.wte.weight")


# --- KV cache, generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("width,k", [(1.0, 2), (0.5, 1), (0.3, 4), (ConfidenceWidth(2.0, 0.5), 2)])
def test_kv_cache_matches_full_forward(width, k):
    model = tiny()
    idx = tokens(B=2, T=20)
    full = model(idx, idx, width=width, k_exp=k).logits
    cache = model.new_kv_cache()
    steps = [model(idx[:, :8], width=width, k_exp=k, kv_cache=cache).logits[:, -1]]
    for t in range(8, 20):
        steps.append(model(idx[:, t:t + 1], width=width, k_exp=k, kv_cache=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 7:19], rtol=1e-4, atol=1e-5)


def test_kv_cache_is_written_in_place_and_refuses_what_it_cannot_hold():
    model = tiny(block_size=16)
    cache = model.new_kv_cache()
    model(tokens(B=2, T=10), kv_cache=cache)
    buffer = cache[0]["k"]
    assert buffer.shape == (2, 2, 16, 32) and cache[0]["n"] == 10   # (B, nh, block_size, head_size), 10 filled
    for t in range(6):
        model(tokens(B=2, T=1, seed=t), kv_cache=cache)
    assert cache[0]["k"] is buffer and cache[0]["n"] == 16              # the same buffer, now full
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(tokens(B=2, T=1), kv_cache=cache)
    cache = model.new_kv_cache()
    model(tokens(B=2, T=3), kv_cache=cache)
    with pytest.raises(ValueError, match="one token at a time"):   # a filled cache: no causal mask for a chunk
        model(tokens(B=2, T=2), kv_cache=cache)


def window_lengths(prompt, steps, block):
    """What generate's docstring promises each step reads: the prompt's last block tokens, then one more a step,
    back to the last block // 2 tokens when it would outgrow block. Written out for a test, not computed like
    generate does."""
    lengths, n = [], min(prompt, block)
    for _ in range(steps):
        lengths.append(n)
        n = n + 1 if n < block else block // 2
    return lengths


@pytest.mark.parametrize("prompt", [3, 20])
def test_generate_reads_a_window_that_restarts_from_its_last_half(prompt):
    # what each step's forward reads (trace: its stats, widths (B, T, k)): without the cache the whole window
    # every step; with it the window where the cache is (re)filled (the first step, each restart), else one token
    model = tiny(block_size=16).eval()
    whole = window_lengths(prompt, 40, 16)
    assert whole[:3] == ([3, 4, 5] if prompt == 3 else [16, 8, 9]) and min(whole) == min(prompt, 8)
    cached = [n if s == 0 or n < whole[s - 1] else 1 for s, n in enumerate(whole)]   # a refill: the window
    for use_cache, expected in ((False, whole), (True, cached)):
        trace = []
        model.generate(tokens(B=1, T=prompt), 40, use_cache=use_cache, trace=trace)
        assert [stats["ran_width"][0].size(1) for stats in trace] == expected


def decode(model, prompt, use_cache, fast, **kw):
    """generate's tokens, the logits of every step (B, steps, V) and the spent FLOPs, from seed 7."""
    model.set_fast(fast)
    logits = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[:, -1].clone()))
    torch.manual_seed(7)
    try:
        idx, flops = model.generate(prompt, 40, use_cache=use_cache, **kw)
    finally:
        hook.remove()
        model.set_fast(True)
    return idx, torch.stack(logits, 1), flops


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dials", [dict(width=1.0), dict(width=0.5, k_exp=1), dict(width=[0.25, 1.0]),
                                   dict(width=ConfidenceWidth(2.0, 0.5)), dict(width=0.5, route_top_p=0.6),
                                   dict(width=ConfidenceWidth(4.0, 0.4), route_top_p=0.7, k_exp=3)])
def test_generate_with_the_cache_matches_the_uncached_reference(B, dials):
    # past block_size (40 tokens, block 16: three restarts), greedy and sampled, with fast_decode.py's path (B = 1
    # and k_exp = 1 at B = 3 take it: B * k <= n_exp) and without: the same tokens, the same logits at every step
    model = tiny(block_size=16, moe_stride=1).eval()   # two MoE layers
    prompt = tokens(B=B, T=3)
    for sampling in (dict(top_k=1), dict(temperature=1.3)):
        ref, ref_logits, _ = decode(model, prompt, False, fast=False, **sampling, **dials)
        assert ref.shape == (B, 43) and len({tuple(row.tolist()) for row in ref}) == B   # the rows differ
        for fast in (True, False):
            out, logits, flops = decode(model, prompt, True, fast, **sampling, **dials)
            assert torch.equal(out, ref), (sampling, fast)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
            if isinstance(dials["width"], float) and "route_top_p" not in dials:   # uniform: the analytic count
                assert flops == pytest.approx(model.flops_per_token(dials["width"], dials.get("k_exp")))


def test_generate_leaves_onednn_as_it_found_it():
    # decoding on the CPU switches oneDNN off (its GELU is slow on one row) and back, also when it fails
    model = tiny(block_size=16)
    for was in (True, False):
        torch.backends.mkldnn.enabled = was
        model.generate(tokens(B=1, T=3), 2)
        assert torch.backends.mkldnn.enabled == was
        with pytest.raises(ValueError):
            model.generate(tokens(B=1, T=3), 2, width=1.5)
        assert torch.backends.mkldnn.enabled == was
    torch.backends.mkldnn.enabled = True


def test_generate_top_k_keeps_only_the_k_most_likely_tokens():
    # top_k=1 is greedy decoding: every token is the argmax of the logits that forward gives for its prefix
    model = tiny().eval()
    torch.manual_seed(3)
    out, _ = model.generate(tokens(B=1, T=4), 12, top_k=1, temperature=0.7)
    out = out.clone()                                    # generate's tensors are inference tensors
    for t in range(4, out.size(1)):
        assert out[0, t] == model(out[:, :t]).logits[0, -1].argmax()
    # top_k=3: over many draws from one prefix, only the 3 most likely next tokens come up
    prefix = tokens(B=1, T=4)
    top3 = set(model(prefix).logits[0, -1].topk(3).indices.tolist())
    drawn = {model.generate(prefix, 1, top_k=3)[0][0, -1].item() for _ in range(60)}
    assert drawn <= top3 and len(drawn) > 1


def test_dropout_acts_in_training_mode_only():
    model, idx = tiny(dropout=0.5), tokens()
    model.train()
    assert not torch.equal(model(idx, idx).loss, model(idx, idx).loss)
    model.eval()
    assert torch.equal(model(idx, idx).loss, model(idx, idx).loss)


def test_reordering_hidden_units_keeps_full_width_function():
    model = tiny(bias=True)
    idx = tokens()
    before = model(idx, idx).logits
    ex = moe_layer(model).experts
    ex.reorder_hidden_units_(torch.rand(4, 256))
    torch.testing.assert_close(model(idx, idx).logits, before, rtol=1e-4, atol=1e-5)


# --- bad input fails with a clear ValueError --------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(width=0.0), r"width must be in \(0, 1\]"),
    (dict(width=1.5), r"width must be in \(0, 1\]"),
    (dict(width=-0.2), r"width must be in \(0, 1\]"),
    (dict(width=[0.5]), r"MoE layers"),
    (dict(k_exp=0), r"k_exp must be an integer in \[1, n_exp=4\]"),
    (dict(k_exp=5), r"k_exp must be an integer in \[1, n_exp=4\]"),
    (dict(width=[0.5, "wide"]), r"width must be a number in \(0, 1\], a WidthPolicy, or a list"),
    (dict(k_pool=5), r"k_pool must be in \[1, n_exp=4\]"),
])
def test_bad_dials_raise(kw, match):
    model = tiny(n_layer=4)
    with pytest.raises(ValueError, match=match):
        model(tokens(), **kw)


def test_bad_config_and_dense_dials_raise():
    with pytest.raises(ValueError, match=r"k_exp must be in \[1, n_exp=4\]"):
        GPTConfig(n_exp=4, k_exp=5)
    dense = tiny(n_exp=0)
    with pytest.raises(ValueError, match="dense"):
        dense(tokens(), width=0.5)
    with pytest.raises(ValueError, match="dense"):
        dense(tokens(), k_exp=1)
    with pytest.raises(ValueError, match="width must be in"):
        UniformWidth(0)
    with pytest.raises(ValueError, match="block_size"):
        tiny()(tokens(T=65))


# --- the paper's model sizes, from the shipped OpenWebText configs ----------------------------------------

@pytest.mark.parametrize("size,params", [("small", 55.1), ("standard", 322.6), ("medium", 1059.3)])
def test_owt_configs_have_the_papers_parameter_counts(size, params, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.abspath(__file__)))   # config files exec each other by path
    values = {}
    exec(f"exec(open('config/train_owt_mose_{size}.py').read())", {}, values)
    keys = ("n_layer", "n_head", "n_embd", "n_exp", "k_exp", "moe_stride", "expert_hidden", "width_multiple")
    with torch.device("meta"):   # no memory, no init cost: only the shapes
        model = GPT(GPTConfig(block_size=values["block_size"], **{k: values[k] for k in keys}))
    assert round(model.get_num_params(non_embedding=False) / 1e6, 1) == params
