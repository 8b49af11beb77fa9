"""Tests of the dispatch (MoSELayer.dispatch: pairs sorted by width, one grouped matmul pair per width) against
two slow, obviously-correct references, forward and gradients: every expert at full width on every token with a
prefix mask (`masked_reference`), and one (token, expert) pair at a time (`pair_by_pair`). Every test runs twice:
on the plain code of model.py and with fast_decode.py's path (MoSELayer.use_fast). No timing here: bench_speed.py
measures the speed. Run: python -m pytest -q test_dispatch.py"""

import pytest
import torch
import torch.nn.functional as F

from model import ConfidenceWidth, GPTConfig, MoSELayer, prefix_mask


def masked_reference(experts, x, expert_idx, gates, h):
    """Every expert on every token at full width, the hidden units past each (token, expert) pair's h zeroed by a
    mask, weighted by the gates: what the dispatch computes, with no sorting, slicing or grouped kernels."""
    N, k = expert_idx.shape
    out = torch.zeros_like(x)
    centres = torch.arange(experts.H, device=x.device)
    for e in range(experts.c_fc.size(0)):
        a = x @ experts.c_fc[e]                                            # (N, H)
        if experts.b_fc is not None:
            a = a + experts.b_fc[e]
        a = F.gelu(a)
        for j in range(k):
            chosen = (expert_idx[:, j] == e).to(x.dtype)                   # (N,)
            keep = (centres[None, :] < h[:, j:j + 1]).to(x.dtype)            # (N, H) prefix mask
            y = (a * keep) @ experts.c_proj[e]
            if experts.b_proj is not None:
                y = y + experts.b_proj[e]
            out = out + (chosen * gates[:, j].to(x.dtype) * (h[:, j] > 0))[:, None] * y
    return out


def pair_by_pair(experts, x, expert_idx, gates, h, soft_mask=None):
    """One (token, expert) pair at a time, sliced to its h hidden units (a soft mask: at full width, masked)."""
    rows = []
    for t in range(x.size(0)):
        y = torch.zeros_like(x[t])
        for j in range(expert_idx.size(1)):
            e, h_tj = expert_idx[t, j].item(), h[t, j].item()
            if h_tj == 0:                                                  # top-p routing left the pair out
                continue
            h_tj = experts.H if soft_mask is not None else h_tj
            a = x[t] @ experts.c_fc[e, :, :h_tj] + (experts.b_fc[e, :h_tj] if experts.b_fc is not None else 0)
            a = F.gelu(a) * (soft_mask[t, j, :h_tj] if soft_mask is not None else 1)
            y = y + gates[t, j] * (a @ experts.c_proj[e, :h_tj] + (experts.b_proj[e] if experts.b_proj is not None
                                                                     else 0))
        rows.append(y)
    return torch.stack(rows)


@pytest.fixture(autouse=True, params=[True, False], ids=["fast", "plain"])
def fast_paths(request, monkeypatch):
    """Every test of this file on both paths: layers built by layer_for take fast_decode.py's path, or not."""
    monkeypatch.setattr(MoSELayer, "__init__", lambda self, *a, init=MoSELayer.__init__:
                        init(self, *a) or setattr(self, "use_fast", request.param))
    return request.param


def layer_for(bias=False, n_exp=4, width_multiple=1, n_embd=32, expert_hidden=64):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=n_embd, n_exp=n_exp, k_exp=1, expert_hidden=expert_hidden,
                    width_multiple=width_multiple, bias=bias)
    layer = MoSELayer(cfg, 0)
    with torch.no_grad():   # non-zero weights and biases, so every gradient is compared
        for p in layer.experts.parameters():
            p.normal_(0, 0.1)
    return layer


def routing(N, k, n_exp, only=None, seed=1):
    """k distinct experts per token (from `only`, a subset, if given) and gates summing to 1."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, n_exp, generator=g)
    if only is not None:
        scores[:, [e for e in range(n_exp) if e not in only]] = -1.0   # those experts get no token
    expert_idx = scores.topk(k, dim=-1).indices                          # (N, k)
    gates = torch.rand(N, k, generator=g).softmax(dim=-1)                # (N, k)
    return expert_idx, gates


def widths_for(kind, gates, seed=2):
    if kind == "random":      # a width per pair, continuous: many distinct hidden-unit counts
        return torch.rand(gates.shape, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.1
    if kind == "confidence":
        return ConfidenceWidth(gamma=2.0, Gamma=0.5)(gates, 0)
    return torch.full_like(gates, kind)


def run_all(layer, x, expert_idx, gates, h, soft=None):
    """Output and gradients (input, gates, expert weights, widths if soft) of the dispatch and the references."""
    fns = dict(dispatch=lambda xx, g, m: layer.dispatch(xx, expert_idx, g, h, soft_mask=m),
               pairs=lambda xx, g, m: pair_by_pair(layer.experts, xx, expert_idx, g, h, m))
    if soft is None:
        fns["masked"] = lambda xx, g, m: masked_reference(layer.experts, xx, expert_idx, g, h)
    results = {}
    for name, fn in fns.items():
        layer.zero_grad()
        xx, g = x.clone().requires_grad_(), gates.clone().requires_grad_()
        w = soft.detach().clone().requires_grad_() if soft is not None else None
        y = fn(xx, g, prefix_mask(w, h, layer.experts.H) if w is not None else None)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[name] = [y.detach(), xx.grad, g.grad] + [p.grad.clone() for p in layer.experts.parameters()] + \
                        ([w.grad] if w is not None else [])
    return results


def assert_all_close(results, **tol):
    ref = results.pop("pairs")
    for name, res in results.items():
        for a, b in zip(res, ref):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", [1.0, 0.5, "confidence", "random"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("width_multiple", [1, 8])   # 1: most widths fall back to the per-expert loop
def test_dispatch_matches_both_references(kind, bias, width_multiple):
    layer = layer_for(bias=bias, width_multiple=width_multiple)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.hidden_units(widths_for(kind, gates))
    assert kind != "random" or h.unique().numel() >= min(30, 64 // width_multiple - 1)   # many distinct widths
    assert_all_close(run_all(layer, x, expert_idx, gates, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_and_experts_without_tokens(k):
    layer = layer_for(n_exp=6, width_multiple=4)
    x = torch.randn(40, 32)
    expert_idx, gates = routing(40, k, 6, only=[0, 2, 3, 5])       # experts 1 and 4 get no token
    assert not ((expert_idx == 1) | (expert_idx == 4)).any()
    h = layer.experts.hidden_units(widths_for("random", gates))
    assert_all_close(run_all(layer, x, expert_idx, gates, h), rtol=1e-4, atol=1e-5)


def test_pairs_left_out_run_nothing():
    # top-p routing gives the pairs a token does not use h = 0: they are skipped, and so is a whole expert
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(30, 32)
    expert_idx, gates = routing(30, 2, 4)
    h = layer.experts.hidden_units(widths_for("random", gates))
    h[::2, 1] = 0
    h[expert_idx == 3] = 0
    assert_all_close(run_all(layer, x, expert_idx, gates, h), rtol=1e-4, atol=1e-5)


def test_grouped_matmul_and_its_fallback_agree(monkeypatch):
    # the same dispatch with F.grouped_mm taken away (what a device without the kernel runs: a loop over experts)
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.hidden_units(widths_for("random", gates))
    calls = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(1) or grouped_mm(*a, **kw))
    grouped = run_all(layer, x, expert_idx, gates, h)["dispatch"]
    assert calls                                                    # the CPU runs the grouped kernel
    monkeypatch.delattr(F, "grouped_mm")
    looped = run_all(layer, x, expert_idx, gates, h)["dispatch"]
    for a, b in zip(grouped, looped):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_weights():
    # dials.fit_ttt freezes the weights: no gradient for them, the same gradient for the input
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(24, 32)
    expert_idx, gates = routing(24, 2, 4)
    h = layer.experts.hidden_units(widths_for("random", gates))
    ref = run_all(layer, x, expert_idx, gates, h)["pairs"][1]          # input gradient, weights trainable
    layer.zero_grad()
    layer.requires_grad_(False)
    xx = x.clone().requires_grad_()
    y = layer.dispatch(xx, expert_idx, gates, h)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    torch.testing.assert_close(xx.grad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_soft_prefix_mask_path(bias):
    # fit_ttt's path: every pair at full width times the differentiable prefix mask; the widths get gradients
    layer = layer_for(bias=bias, width_multiple=4)
    x = torch.randn(40, 32)
    expert_idx, gates = routing(40, 2, 4)
    w = widths_for("random", gates)
    h = layer.experts.hidden_units(w)
    results = run_all(layer, x, expert_idx, gates, h, soft=w)
    assert results["dispatch"][-1].abs().sum() > 0                 # gradient reaches the widths
    assert_all_close(results, rtol=1e-4, atol=1e-5)
    hard = masked_reference(layer.experts, x, expert_idx, gates, h)   # forward is exactly the hard prefix
    torch.testing.assert_close(results["dispatch"][0], hard.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width_multiple", [1, 8])
def test_bfloat16_autocast(width_multiple):
    # what cuda runs (autocast to bf16, where F.grouped_mm takes bf16), exercised on the CPU
    layer = layer_for(bias=True, width_multiple=width_multiple)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.hidden_units(widths_for("confidence", gates))
    results = {}
    for name, fn in (("dispatch", layer.dispatch), ("pairs", lambda *a: pair_by_pair(layer.experts, *a))):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xx, expert_idx, gates, h)
        y.float().square().sum().backward()
        results[name] = (y, xx.grad, *[p.grad.clone() for p in layer.experts.parameters()])
    y = results["dispatch"][0]
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), masked_reference(layer.experts, x, expert_idx, gates, h), rtol=2e-2,
                               atol=2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.experts.parameters())
    for a, b in zip(results["dispatch"][1:], results["pairs"][1:]):   # to bf16 precision, relative to their size
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("width,route_top_p", [(1.0, None), (0.25, None), (ConfidenceWidth(2.0, 0.5), None),
                                         (0.5, 0.6), (ConfidenceWidth(1.0, 0.5), 0.6)])
def test_decoding_a_token_without_autograd(N, width, route_top_p, fast_paths):
    # decoding: one or two tokens, no autograd, fewer pairs than experts (fast_decode.decode_moe where fast paths are
    # on); the same output and FLOPs as with autograd
    layer = layer_for(bias=True, width_multiple=4)
    torch.nn.init.normal_(layer.router.w_g.weight, std=1.0)   # confident gates: the policy's widths differ
    x = torch.randn(1, N, 32)
    slow = layer(x, width, 2, route_top_p=route_top_p)
    with torch.inference_mode():
        fast = layer(x, width, 2, route_top_p=route_top_p)
    r = layer.router(x.view(N, 32), 2, route_top_p=route_top_p)
    ref = pair_by_pair(layer.experts, x.view(N, 32), r.expert_idx, r.gates, slow.h)
    torch.testing.assert_close(fast.y, slow.y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.y.view(N, 32), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.spent, slow.spent)
    torch.testing.assert_close(fast.h, slow.h)
    calls = []
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:   # which path ran
        mp.setattr(layer, "dispatch", lambda *a, **kw: calls.append(1) or MoSELayer.dispatch(layer, *a, **kw))
        layer(x, width, 2, route_top_p=route_top_p)
    assert bool(calls) != fast_paths


def test_bfloat16_decoding_under_autocast():
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(1, 2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = layer(x, ConfidenceWidth(2.0, 0.5), 2)
        with torch.inference_mode():
            fast = layer(x, ConfidenceWidth(2.0, 0.5), 2)
    torch.testing.assert_close(fast.y.float(), slow.y.detach().float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.spent, slow.spent)
