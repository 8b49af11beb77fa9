"""Tests of the fast dispatch (MoSELayer.dispatch: one grouped matmul pair per width) against the bucket loop
(MoSELayer.dispatch_loop) and the masked reference (SlimmableExperts.forward_reference), forward and gradients.
No timing here: bench_speed.py measures the speed. Run: python -m pytest -q test_dispatch.py"""

import functools

import pytest
import torch

import model as model_module
from model import ConfidenceWidth, GPTConfig, MoSELayer, prefix_mask


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
    """Output and gradients (input, gates, expert weights, widths if soft) of the three implementations."""
    fns = dict(fast=lambda xx, g, m: layer.dispatch(xx, expert_idx, g, h, soft_mask=m),
               loop=lambda xx, g, m: layer.dispatch_loop(xx, expert_idx, g, h, soft_mask=m))
    if soft is None:
        fns["reference"] = lambda xx, g, m: layer.experts.forward_reference(xx, expert_idx, g, h)
    results = {}
    for name, fn in fns.items():
        layer.zero_grad()
        xx, g = x.clone().requires_grad_(), gates.clone().requires_grad_()
        w = soft.detach().clone().requires_grad_() if soft is not None else None
        y = fn(xx, g, prefix_mask(w, h, layer.experts.hidden) if w is not None else None)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[name] = [y.detach(), xx.grad, g.grad] + [p.grad.clone() for p in layer.experts.parameters()] + \
                        ([w.grad] if w is not None else [])
    return results


def assert_all_close(results, **tol):
    ref = results.pop("reference", None) or results.pop("loop")
    for name, res in results.items():
        for a, b in zip(res, ref):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", [1.0, 0.5, "confidence", "random"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("width_multiple", [1, 8])   # 1: most widths fall back to the per-expert loop
def test_fast_dispatch_matches_loop_and_reference(kind, bias, width_multiple):
    layer = layer_for(bias=bias, width_multiple=width_multiple)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.h(widths_for(kind, gates))
    assert kind != "random" or h.unique().numel() >= min(30, 64 // width_multiple - 1)   # many distinct widths
    assert_all_close(run_all(layer, x, expert_idx, gates, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_every_k_and_experts_without_tokens(k):
    layer = layer_for(n_exp=6, width_multiple=4)
    x = torch.randn(40, 32)
    expert_idx, gates = routing(40, k, 6, only=[0, 2, 3, 5])       # experts 1 and 4 get no token
    assert not ((expert_idx == 1) | (expert_idx == 4)).any()
    h = layer.experts.h(widths_for("random", gates))
    assert_all_close(run_all(layer, x, expert_idx, gates, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("width,top_p", [(1.0, None), (0.25, None), (ConfidenceWidth(2.0, 0.5), None),
                                         (0.5, 0.6), (ConfidenceWidth(1.0, 0.5), 0.6)])
def test_few_pairs_path_for_decoding(bias, N, width, top_p):
    # no more (token, expert) pairs than experts and no autograd (decoding): forward_few runs each pair on its
    # own row, from the routing read back to the host; the same output, FLOPs and mean width as forward
    layer = layer_for(bias=bias, width_multiple=4)
    torch.nn.init.normal_(layer.router.w_g.weight, std=1.0)   # confident gates: the policy's widths differ
    x = torch.randn(1, N, 32)
    with torch.enable_grad():
        slow = layer(x, width, 2, top_p=top_p)
    with torch.no_grad():
        few = layer(x, width, 2, top_p=top_p)
    if top_p is not None:
        assert not slow.routing.used.all()                                # some pair is left out
    torch.testing.assert_close(few.y, slow.y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(few.spent, slow.spent)
    torch.testing.assert_close(few.mean_width, slow.mean_width)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer, "dispatch", None)                               # the sort-based path is not taken
        layer(x, width, 2, top_p=top_p)


def test_grouped_matmul_and_its_fallback_agree(monkeypatch):
    # the same dispatch with F.grouped_mm switched off everywhere (what an unsupported device runs)
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.h(widths_for("random", gates))
    assert model_module.grouped_mm_runs(x, 32, 64, 16)     # the CPU runs the grouped kernel at aligned widths
    grouped = run_all(layer, x, expert_idx, gates, h)["fast"]
    monkeypatch.setattr(model_module, "grouped_mm_runs", lambda *a: False)
    looped = run_all(layer, x, expert_idx, gates, h)["fast"]
    for a, b in zip(grouped, looped):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", 0.5])
def test_width_by_width_and_expert_by_expert_match(monkeypatch, kind):
    # the CPU runs each expert's widths back to back, a GPU each width over all experts (row_blocks): both
    # orders here, each against the loop and the reference, and against each other
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.h(widths_for(kind, gates))
    dispatch, fast = layer.dispatch, {}
    for by_expert in (False, True):
        monkeypatch.setattr(layer, "dispatch", functools.partial(dispatch, by_expert=by_expert))
        results = run_all(layer, x, expert_idx, gates, h)
        assert_all_close(results, rtol=1e-4, atol=1e-5)
        fast[by_expert] = results["fast"]
    for a, b in zip(fast[False], fast[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_weight_gradient_grouped_and_in_place_agree():
    # the GPU's one grouped matmul and the CPU's per-expert addmm_ into a slice of one buffer (empty expert included)
    x, dy, counts = torch.randn(10, 32), torch.randn(10, 16), [3, 0, 7]
    looped, grouped = torch.ones(3, 32, 24), torch.ones(3, 32, 24)
    model_module.expert_matmul_weight_grad_(looped[:, :, :16], x, dy, counts)
    model_module.expert_matmul_weight_grad_(grouped[:, :, :16], x, dy, counts, grouped=True)
    ref = torch.stack([x[:3].t() @ dy[:3], torch.zeros(32, 16), x[3:].t() @ dy[3:]]) + 1
    for g in (looped, grouped):
        torch.testing.assert_close(g[:, :, :16], ref)
        assert (g[:, :, 16:] == 1).all()                           # past the slice: untouched


def test_frozen_weights_and_a_strided_output_gradient():
    # fit_ttt freezes the weights (their gradients are skipped); a caller may hand back an expanded gradient
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(24, 32)
    expert_idx, gates = routing(24, 2, 4)
    h = layer.experts.h(widths_for("random", gates))
    ref = run_all(layer, x, expert_idx, gates, h)["loop"][1]          # input gradient, weights trainable
    layer.zero_grad()
    layer.requires_grad_(False)
    xx = x.clone().requires_grad_()
    y = layer.dispatch(xx, expert_idx, gates, h)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    torch.testing.assert_close(xx.grad, ref, rtol=1e-4, atol=1e-5)
    layer.requires_grad_(True)
    rows, expert = torch.randn(48, 32), torch.arange(4).repeat_interleave(12)
    grads = []
    for fn in (lambda r: layer.experts.forward_grouped(r, [[12, 12, 12, 12]], [64], expert),
               lambda r: torch.cat([layer.experts(r[12 * e:12 * (e + 1)], e, 64) for e in range(4)])):
        r = rows.clone().requires_grad_()
        fn(r).sum().backward()                                          # sum's gradient: an expanded (0, 0) view
        grads.append(r.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_row_blocks():
    counts, hs = [[3, 0, 1], [8, 6, 0]], [16, 32]           # (width, expert) buckets: 2 widths, 3 experts
    assert model_module.row_blocks(counts, hs, False) == [(16, [3, 0, 1]), (32, [8, 6, 0])]
    assert model_module.row_blocks(counts, hs, True) == [(16, [3, 0, 0]), (32, [8, 0, 0]), (32, [0, 6, 0]),
                                                         (16, [0, 0, 1])]


@pytest.mark.parametrize("bias", [False, True])
def test_soft_prefix_mask_path(bias):
    # fit_ttt's path: every pair at full width times the differentiable prefix mask; the widths get gradients
    layer = layer_for(bias=bias, width_multiple=4)
    x = torch.randn(40, 32)
    expert_idx, gates = routing(40, 2, 4)
    w = widths_for("random", gates)
    h = layer.experts.h(w)
    results = run_all(layer, x, expert_idx, gates, h, soft=w)
    assert results["fast"][-1].abs().sum() > 0                     # gradient reaches the widths
    assert_all_close(results, rtol=1e-4, atol=1e-5)
    hard = layer.experts.forward_reference(x, expert_idx, gates, h)  # forward is exactly the hard prefix
    torch.testing.assert_close(results["fast"][0], hard.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width_multiple", [1, 8])
def test_bfloat16_autocast(width_multiple):
    layer = layer_for(bias=True, width_multiple=width_multiple)
    x = torch.randn(48, 32)
    expert_idx, gates = routing(48, 2, 4)
    h = layer.experts.h(widths_for("confidence", gates))
    grads = {}
    for name, fn in (("fast", layer.dispatch), ("loop", layer.dispatch_loop)):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xx, expert_idx, gates, h)
        y.float().square().sum().backward()
        grads[name] = (y, xx.grad, *[p.grad.clone() for p in layer.experts.parameters()])
    fast, loop = grads["fast"][0], grads["loop"][0]
    ref = layer.experts.forward_reference(x, expert_idx, gates, h)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.float(), loop.float(), rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.experts.parameters())
    for a, b in zip(grads["fast"][1:], grads["loop"][1:]):   # gradients, to bf16 precision (relative to their size)
        assert a.dtype == b.dtype and (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


def test_few_pairs_path_under_bfloat16_autocast():
    layer = layer_for(bias=True, width_multiple=4)
    x = torch.randn(1, 2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = layer(x, ConfidenceWidth(2.0, 0.5), 2)
        with torch.no_grad():
            few = layer(x, ConfidenceWidth(2.0, 0.5), 2)
    assert slow.y.dtype == torch.bfloat16     # few.y may be float32: its bias adds outside autocast
    torch.testing.assert_close(few.y.float(), slow.y.detach().float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(few.spent, slow.spent)
