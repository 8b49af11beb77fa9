"""
nanoMoSE: a GPT whose MoE layers have *slimmable* experts (Mixture of Slimmable Experts, MoSE).

Read top to bottom:
  1. GPTConfig                  every knob, one line each
  2. CausalSelfAttention, MLP    the dense parts, as in nanoGPT (attention is never slimmed)
  3. Router                      fp32 gate -> softmax -> top-k (or top-p: experts until their mass reaches p,
                                 Matryoshka MoE's routing and an inference dial); load-balancing, z and
                                 hierarchical losses
  4. SlimmableExperts            stacked expert weights; expert e at width w runs its first h(w) hidden units;
                                 GroupedSlimmableFFN, their fast path: big blocks of rows (row_blocks: a width
                                 over all experts on a GPU, an expert's widths back to back on the CPU), with
                                 the backward written out so that every block adds into one weight gradient
  5. MoSELayer                   dropless sort-based dispatch: route -> widths -> sort -> run -> combine;
                                 `dispatch` runs the blocks above, `dispatch_loop` (the explanation and test
                                 reference) one matmul pair per (width, expert) bucket; `forward_few` is
                                 decoding's path (a token's k pairs one by one, no sort)
  6. Width policies              turn router probabilities into widths: uniform, confidence, and RandomWidth
                                 (training); fitting them to a FLOPs budget (bisection), by test-time training
                                 of gamma (ttt), by a search over gamma, a layer-wise allocator, and both
                                 dials at once (a width with the top-p routing that meets the budget)
  7. Block, GPT                  forward(idx, targets, width, k_exp), flops_per_token, generate (KV cache;
                                 without_onednn says why decoding on the CPU switches oneDNN off)

References: MoSE (Tastan et al., ICML 2026, arXiv 2602.06154); Matryoshka MoE (arXiv 2509.26520);
Elastic MoE (arXiv 2509.21892); Switch Transformer (load-balancing loss); ST-MoE (router z-loss);
Slimmable / Universally Slimmable Networks (nested prefix widths, sandwich rule); nanoGPT, nanoMoE.
"""

import contextlib
import math
import os
import pickle
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Config


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304         # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False              # biases in Linears, LayerNorms and experts (GPT-2: True)
    # the mixture
    n_exp: int = 8                  # experts per MoE layer; 0 = a dense GPT (plain MLP everywhere)
    k_exp: int = 2                  # experts per token during training (a dial at inference)
    moe_stride: int = 2             # block i is an MoE block iff i % moe_stride == 0 (nanoMoE's layout)
    expert_hidden: int = 0          # hidden units of one expert at full width; 0 means 4 * n_embd
    width_multiple: int = 1         # h(w) is rounded to a multiple of this (e.g. 64 for tensor cores)
    aux_loss_weight: float = 0.01   # Switch load-balancing loss
    z_loss_weight: float = 0.001    # ST-MoE router z-loss
    hr_loss_weight: float = 0.0     # Elastic MoE hierarchical router loss (0 = off)

    def __post_init__(self):
        if self.expert_hidden == 0:
            self.expert_hidden = 4 * self.n_embd
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_exp < 0 or (self.n_exp > 0 and not 1 <= self.k_exp <= self.n_exp):
            raise ValueError(f"k_exp must be in [1, n_exp={self.n_exp}], got {self.k_exp}")
        if self.moe_stride < 1:
            raise ValueError(f"moe_stride must be >= 1, got {self.moe_stride}")
        if not 1 <= self.width_multiple <= self.expert_hidden:
            raise ValueError(f"width_multiple must be in [1, expert_hidden={self.expert_hidden}]")

    def is_moe(self, layer):
        return self.n_exp > 0 and layer % self.moe_stride == 0

    @property
    def n_moe_layers(self):
        return sum(self.is_moe(i) for i in range(self.n_layer))


# -----------------------------------------------------------------------------
# 2. The dense parts (nanoGPT)


def dropout_layer(p):
    """nn.Dropout, or nothing at p = 0 (the configs' default). In eval mode nn.Dropout still costs a module
    call and a torch op, and decoding one token is overhead-bound: it is about 200 ops of a few µs each."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = dropout_layer(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = [t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, hs)
        if cache is not None:
            # KV cache for generation: keys/values of earlier positions are kept, only new ones computed.
            # Either the cache is empty (prefill, causal) or we add one token that sees everything before it.
            if cache and T != 1:
                raise ValueError("a filled KV cache takes one token at a time")
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = dropout_layer(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# -----------------------------------------------------------------------------
# 3. Router


class Routing(NamedTuple):
    expert_idx: torch.Tensor   # (N, k) which experts each token uses
    gates: torch.Tensor        # (N, k) their mixing weights, softmax renormalised over the k selected
    probs: torch.Tensor        # (N, E) router probabilities over all experts (softmax of the fp32 logits)
    loss: torch.Tensor         # () weighted sum of this layer's router losses
    load: torch.Tensor         # (n_exp,) fraction of (token, expert) pairs sent to each expert
    used: torch.Tensor = None  # (N, k) bool, top-p routing only: which of the k pairs the token uses (the
                               # others have gate 0 and are never run); None = all k are used


class MoEOutput(NamedTuple):
    """What one MoSE layer hands back up to GPT.forward."""
    y: torch.Tensor            # (B, T, C) the layer's output
    routing: Routing           # the router's decisions and losses
    spent: torch.Tensor        # (N,) expert FLOPs each token spent in this layer
    mean_width: torch.Tensor   # () mean width over the (token, expert) pairs that ran
    h: torch.Tensor = None     # (N, k) hidden units each (token, expert) pair ran (0: not run, top-p routing)


class Router(nn.Module):
    """Linear gate in fp32 -> softmax over all experts -> top-k -> renormalised gates.

    fp32 because the softmax over expert logits is sensitive to bf16/fp16 rounding (Switch Transformer).
    The gates are the router probabilities the width policies read: for the selected experts S of a token,
    gate_i = p_i / sum_{j in S} p_j, so any policy defined on p_i^gamma renormalised over S sees the same.
    """

    def __init__(self, config):
        super().__init__()
        self.n_exp = config.n_exp
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        self.aux_loss_weight = config.aux_loss_weight
        self.z_loss_weight = config.z_loss_weight
        self.hr_loss_weight = config.hr_loss_weight

    def forward(self, x, k, k_pool=None, top_p=None):
        # x: (N, C) tokens; k: experts per token (with top_p: at most); k_pool: Elastic MoE co-activation pool
        # (training only); top_p: Matryoshka MoE's top-p routing, a probability mass in (0, 1]
        # autocast switched off only where it is on: entering torch.autocast costs µs, decoding is overhead-bound
        fp32 = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
            else contextlib.nullcontext()
        with fp32:
            logits = F.linear(x.float(), self.w_g.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)                              # (N, E)
        if k_pool is not None and k_pool > k:
            expert_idx = self.coactivation_sample(probs, k, k_pool)
            top_probs = probs.gather(1, expert_idx)
        else:
            top_probs, expert_idx = probs.topk(k, dim=-1)           # (N, k), sorted by probability
        used = None
        if top_p is not None:
            # each token takes experts in order of probability until their mass reaches top_p (at least one,
            # at most k): pair j is used iff the mass of the pairs before it is still short of top_p
            mass_before = top_probs.cumsum(dim=-1) - top_probs      # (N, k)
            used = mass_before < top_p
            used[:, 0] = True
            top_probs = top_probs * used                            # unused pairs: gate 0
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True)
        # load: fraction of all (token, expert) assignments that went to each expert; 1/E each when balanced
        # (top-p routing: only the used pairs count; the unused go to an extra bin E, dropped: no host sync)
        pairs = expert_idx if used is None else expert_idx.masked_fill(~used, self.n_exp)
        n_pairs = expert_idx.numel() if used is None else used.sum()
        load = torch.bincount(pairs.flatten(), minlength=self.n_exp + 1)[:self.n_exp].float() / n_pairs   # (E,)
        if not self.training:   # the losses are a training objective: skipped in eval mode (decoding is
            return Routing(expert_idx, gates, probs, logits.new_zeros(()), load, used)  # overhead-bound)
        loss = self.aux_loss_weight * self.n_exp * (load * probs.mean(dim=0)).sum()   # Switch: = 1 at balance
        loss = loss + self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()  # ST-MoE z-loss
        if self.hr_loss_weight > 0:
            # Elastic MoE: -KL(q || uniform) = H(q) - log E. Sharpens each token's ranking of all experts so
            # that its top-1/2/4 prefixes are meaningful when k changes at inference.
            entropy = -(probs * probs.clamp_min(1e-9).log()).sum(dim=-1).mean()
            loss = loss + self.hr_loss_weight * (entropy - math.log(self.n_exp))
        return Routing(expert_idx, gates, probs, loss, load.detach(), used)

    @staticmethod
    def coactivation_sample(probs, k, k_pool):
        """Elastic MoE co-activation sampling: per token draw a pool size m ~ U{k..k_pool}, then use k experts
        drawn uniformly without replacement from the router's top-m. Experts learn to work in combinations
        they would meet with a larger k, at the training cost of k experts."""
        N = probs.size(0)
        pool = probs.topk(k_pool, dim=-1).indices                                          # (N, k_pool)
        m = torch.randint(k, k_pool + 1, (N, 1), device=probs.device)                      # (N, 1)
        rank = torch.arange(k_pool, device=probs.device)                                   # (k_pool,)
        keys = torch.rand(N, k_pool, device=probs.device).masked_fill(rank >= m, 2.0)      # outside pool: never
        return pool.gather(1, keys.topk(k, dim=-1, largest=False).indices)                 # (N, k)


# -----------------------------------------------------------------------------
# 4. Slimmable experts


def hidden_units(width, full, multiple=1):
    """h(w): the number of leading hidden units an expert of `full` units runs at width w.
    Rounded to the nearest multiple of `multiple`, at least one multiple and at most `full`.
    Works on a float or on a tensor of widths, with the same float32 rounding for both."""
    if not isinstance(width, torch.Tensor):   # on the host, no tensor ops (decoding calls this per layer)
        units = np.round(np.float32(width) * np.float32(full) / np.float32(multiple))   # half to even, as torch
        return int(min(max(units * multiple, multiple), full))
    w = width.float()                          # float32 on every device (mps has no float64)
    return (torch.round(w * full / multiple) * multiple).clamp(min=multiple, max=full).long()


def pair_flops(n_embd, h):
    """Forward FLOPs of one (token, expert) pair at h hidden units: two matmuls, (1 x C) @ (C x h) and
    (1 x h) @ (h x C), at 2 FLOPs per multiply-add. The one place this constant lives (dispatch and
    flops_breakdown both use it)."""
    return 4 * n_embd * h


def check_width(width, name="width"):
    if not 0.0 < width <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {width}")


def grouped_mm_runs(x, *dims):
    """Whether F.grouped_mm takes matrices with these row lengths here: on the CPU in every float dtype, on
    CUDA in bf16 from compute capability 8.0; on both, every row a multiple of 16 bytes (width_multiple 64
    gives that at any width). Where it does not, expert_matmul loops over the experts instead."""
    if not hasattr(F, "grouped_mm") or any(d * x.element_size() % 16 for d in dims):
        return False
    return x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16
                                      and torch.cuda.get_device_capability(x.device) >= (8, 0))


def group_ends(counts, device):
    """F.grouped_mm's offs: where each expert's rows end, (E,) int32, from the rows of each expert."""
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def expert_matmul(x, w, counts, grouped):
    """x (n, K) rows sorted by expert, counts[e] of them for expert e; w (E, K, M). Each expert's rows times
    its own matrix: (n, M). One F.grouped_mm call, or the same as a loop where that kernel does not run."""
    if grouped:
        return F.grouped_mm(x, w, offs=group_ends(counts, x.device))
    return torch.cat([rows @ we for rows, we in zip(x.split(counts), w.unbind(0))])   # unbind: one backward


def expert_matmul_weight_grad_(g, x, dy, counts, grouped=False):
    """expert_matmul's weight gradient, added in place: g[e] += x_e^T @ dy_e over each expert's rows. g may be a
    slice of a bigger buffer (the first h hidden units). On the CPU, expert by expert: BLAS accumulates into the
    slice with no buffer of its own. With grouped (a GPU): one grouped matmul for all experts, then one add."""
    if grouped:
        g.add_(F.grouped_mm(x.t(), dy, offs=group_ends(counts, x.device)))       # (E, K, M)
        return
    for ge, xe, de in zip(g.unbind(0), x.split(counts), dy.split(counts)):
        if not len(xe):                      # an expert without rows here: its gradient slice is left alone
            continue
        if ge.dtype == xe.dtype:
            ge.addmm_(xe.t(), de)
        else:   # bf16 / fp16 activations into the fp32 gradient
            ge.add_(xe.t() @ de)


def row_blocks(counts, hs, by_expert):
    """The blocks of rows that GroupedSlimmableFFN runs, in row order, as (h, rows of each expert); counts (L, E)
    and hs (L,) as dispatch counts them. Width by width (rows sorted by hidden units, then expert): one grouped
    matmul over all experts per width, what a GPU wants (one kernel launch per width). Expert by expert (rows
    sorted by expert, then hidden units; by_expert): each expert's widths back to back, what a CPU wants: the
    expert's weights and hidden activations stay in cache from one width to the next and between its two
    matmuls (a 2-core EPYC, one MoE layer: forward 5 % faster under the confidence policy, forward+backward
    under random_pair 8 %; GELU over one (8,192 x 1,536) tensor took 2.5x as long as over eight expert-sized ones)."""
    if not by_expert:
        return list(zip(hs, counts))
    E = len(counts[0]) if counts else 0
    return [(h, [c[e] if j == e else 0 for j in range(E)]) for e in range(E) for h, c in zip(hs, counts) if c[e]]


class GroupedSlimmableFFN(torch.autograd.Function):
    """SlimmableExperts.forward_grouped: the forward is the arithmetic of SlimmableExperts.forward, one block of
    rows at a time (a width, or an expert at one width; see row_blocks), and the backward is written out.
    Autograd's own backward gives each width's weight slice an (E, C, h) gradient of its own, zero-filled and
    then added into the weight's gradient: at 16 distinct widths (the confidence policy) that memory traffic
    cost half as much as the matmuls. Here each block adds its weight gradient straight into one buffer.
    Tested against autograd through dispatch_loop."""

    @staticmethod
    def forward(ctx, x, c_fc, b_fc, c_proj, b_proj, mask, blocks, expert, dtype):
        x, w_fc, w_proj = x.to(dtype), c_fc.to(dtype), c_proj.to(dtype)
        outs, kept, start = [], [], 0
        for h, counts in blocks:
            n, grouped = sum(counts), grouped_mm_runs(x, *c_fc.shape[1:], h)
            sl = slice(start, start + n)
            pre = expert_matmul(x[sl], w_fc[:, :, :h], counts, grouped)          # (n, h)
            if b_fc is not None:
                pre = pre + b_fc[expert[sl], :h].to(dtype)
            a = F.gelu(pre)
            y = expert_matmul(a if mask is None else a * mask[sl, :h].to(dtype), w_proj[:, :h, :], counts,
                              grouped)                                           # (n, C)
            outs.append(y + b_proj[expert[sl]].to(dtype) if b_proj is not None else y)
            kept += [pre, a]                 # what autograd would keep: pre for gelu's backward, a for c_proj's
            start += n
        ctx.save_for_backward(x, w_fc, w_proj, mask, expert, *kept)
        ctx.blocks, ctx.param_dtype = blocks, c_fc.dtype
        return torch.cat(outs)                                                   # (n_total, C)

    @staticmethod
    def backward(ctx, gy):
        x, w_fc, w_proj, mask, expert, *saved = ctx.saved_tensors
        need_x, need_fc, need_bfc, need_proj, need_bproj, need_mask = ctx.needs_input_grad[:6]   # fit_ttt: frozen
        gy = gy.to(x.dtype).contiguous()                                         # (n_total, C)
        acc = torch.promote_types(ctx.param_dtype, torch.float32)   # bf16 weights: sum their gradients in fp32
        zeros = lambda *shape: torch.zeros(shape, dtype=acc, device=x.device)
        g_fc = zeros(*w_fc.shape) if need_fc else None
        g_proj = zeros(*w_proj.shape) if need_proj else None
        g_bfc = zeros(w_fc.shape[0], w_fc.shape[2]) if need_bfc else None
        g_mask = torch.zeros_like(mask) if mask is not None and need_mask else None
        gx, start = torch.empty_like(x) if need_x else None, 0
        for (h, counts), pre, a in zip(ctx.blocks, saved[0::2], saved[1::2]):
            n, grouped = pre.size(0), grouped_mm_runs(x, *w_fc.shape[1:], h)
            on_gpu = grouped and x.device.type != "cpu"   # there: weight gradients as one grouped matmul too
            sl = slice(start, start + n)
            start += n
            if g_proj is not None:                                               # c_proj[e, :h] += am^T @ gy
                am = a * mask[sl, :h].to(a.dtype) if mask is not None else a
                expert_matmul_weight_grad_(g_proj[:, :h, :], am, gy[sl], counts, on_gpu)
            if not (need_x or need_fc or need_bfc or g_mask is not None):
                continue
            ga = expert_matmul(gy[sl], w_proj[:, :h, :].transpose(1, 2), counts, grouped)   # (n, h)
            if mask is not None:
                if g_mask is not None:
                    g_mask[sl, :h] = (ga * a).to(g_mask.dtype)
                ga = ga * mask[sl, :h].to(ga.dtype)
            gpre = torch.ops.aten.gelu_backward(ga, pre)                         # (n, h)
            if g_fc is not None:                                                 # c_fc[e, :, :h] += x^T @ gpre
                expert_matmul_weight_grad_(g_fc[:, :, :h], x[sl], gpre, counts, on_gpu)
            if g_bfc is not None:
                g_bfc[:, :h].index_add_(0, expert[sl], gpre.to(acc))
            if gx is not None:
                gx[sl] = expert_matmul(gpre, w_fc[:, :, :h].transpose(1, 2), counts, grouped)   # (n, C)
        g_bproj = zeros(w_proj.shape[0], w_proj.shape[2]).index_add_(0, expert, gy.to(acc)) if need_bproj else None
        cast = lambda g: None if g is None else g.to(ctx.param_dtype)
        return gx, cast(g_fc), cast(g_bfc), cast(g_proj), cast(g_bproj), g_mask, None, None, None


class SlimmableExperts(nn.Module):
    """All experts of a layer as stacked weights. Expert e at width w is the GELU FFN
        y = gelu(x @ c_fc[e, :, :h] + b_fc[e, :h]) @ c_proj[e, :h, :] + b_proj[e],   h = h(w)
    i.e. it uses a nested prefix of its hidden units: every width shares the same weights, width 1 is a
    standard MoE expert, and a narrow expert really does less arithmetic (a slice, not a mask)."""

    def __init__(self, config):
        super().__init__()
        E, C, H = config.n_exp, config.n_embd, config.expert_hidden
        self.hidden, self.multiple = H, config.width_multiple
        self.c_fc = nn.Parameter(torch.empty(E, C, H))
        self.c_proj = nn.Parameter(torch.empty(E, H, C))
        self.b_fc = nn.Parameter(torch.zeros(E, H)) if config.bias else None
        self.b_proj = nn.Parameter(torch.zeros(E, C)) if config.bias else None

    def h(self, width):
        return hidden_units(width, self.hidden, self.multiple)

    def forward(self, x, e, h, mask=None):
        # x: (n, C) rows routed to expert e, run at h hidden units; mask: (n, H) optional soft prefix mask
        a = x @ self.c_fc[e, :, :h]                                        # (n, h)
        if self.b_fc is not None:
            a = a + self.b_fc[e, :h]
        a = F.gelu(a)
        if mask is not None:
            a = a * mask.to(a.dtype)
        y = a @ self.c_proj[e, :h, :]                                      # (n, C)
        return y + self.b_proj[e] if self.b_proj is not None else y

    def forward_grouped(self, x, counts, hs, expert, mask=None, by_expert=False):
        """What `forward` does bucket by bucket, in bigger blocks: x (n, C) holds rows sorted by (hidden units,
        expert), or with by_expert by (expert, hidden units); counts (L, E) the rows of each (width, expert)
        bucket, hs the L hidden-unit counts (ascending), expert (n,) each row's expert, mask (n, H) an optional
        soft prefix mask. Width by width, one grouped matmul pair runs every expert on its own contiguous rows
        (F.grouped_mm), so the matmul calls grow with the distinct widths, not widths x experts; expert by
        expert, each of an expert's widths is one block (row_blocks says which suits which device).
        Returns (n, C)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # F.grouped_mm is not on autocast's list: the Function casts as autocast would cast a matmul
        return GroupedSlimmableFFN.apply(x, self.c_fc, self.b_fc, self.c_proj, self.b_proj, mask,
                                         row_blocks(counts, hs, by_expert), expert, dtype)

    def forward_reference(self, x, expert_idx, gates, h):
        """Slow, obviously-correct reference for the tests: every expert on every token at full width,
        hidden units past each (token, expert) pair's h zeroed by a mask, weighted by the gates."""
        N, k = expert_idx.shape
        out = torch.zeros_like(x)
        units = torch.arange(self.hidden, device=x.device)
        for e in range(self.c_fc.size(0)):
            a = x @ self.c_fc[e]                                           # (N, H)
            if self.b_fc is not None:
                a = a + self.b_fc[e]
            a = F.gelu(a)
            for j in range(k):
                chosen = (expert_idx[:, j] == e).to(x.dtype)               # (N,)
                keep = (units[None, :] < h[:, j:j + 1]).to(x.dtype)        # (N, H) prefix mask
                y = (a * keep) @ self.c_proj[e]
                if self.b_proj is not None:
                    y = y + self.b_proj[e]
                out = out + (chosen * gates[:, j].to(x.dtype))[:, None] * y
        return out

    @torch.no_grad()
    def reorder_hidden_units_(self, importance):
        """Permute each expert's hidden units so the most important come first (importance: (E, H)).
        The function of every expert at full width is unchanged; the narrow prefixes get the best units."""
        order = importance.argsort(dim=1, descending=True)                 # (E, H)
        self.c_fc.copy_(self.c_fc.gather(2, order[:, None, :].expand_as(self.c_fc)))
        self.c_proj.copy_(self.c_proj.gather(1, order[:, :, None].expand_as(self.c_proj)))
        if self.b_fc is not None:
            self.b_fc.copy_(self.b_fc.gather(1, order))


# -----------------------------------------------------------------------------
# 5. The MoSE layer: dropless, sort-based dispatch


class MoSELayer(nn.Module):
    """Route -> widths -> sort the (token, expert) pairs by (hidden units, expert) -> run each expert on its
    contiguous rows at that width -> scatter-add back weighted by the gates. No capacity, no dropped tokens:
    a token's output never depends on which other tokens share its batch."""

    def __init__(self, config, moe_index):
        super().__init__()
        self.moe_index = moe_index         # index among the MoE layers (policies may hold one gamma per layer)
        self.router = Router(config)
        self.experts = SlimmableExperts(config)
        self.dropout = dropout_layer(config.dropout)

    def forward(self, x, width=1.0, k=2, k_pool=None, top_p=None):
        B, T, C = x.shape
        if B * T * k <= self.router.n_exp and k_pool is None and not torch.is_grad_enabled():
            return self.forward_few(x, width, k, top_p)                    # decoding a token
        x = x.reshape(B * T, C)                                            # (N, C)
        r = self.router(x, k, k_pool, top_p)
        # widths read the router's gates but never train it; they carry a gradient only when the policy has a
        # parameter being fitted (ttt's gamma), and only then does the dispatch take the differentiable path
        widths = None
        if isinstance(width, WidthPolicy):
            widths = width(r.gates.detach(), self.moe_index)               # (N, k) one width per pair
            h = self.experts.h(widths.detach())                            # (N, k) hidden units per pair
        else:                              # one width for all: h(w) once, on the host
            h = torch.full_like(r.expert_idx, self.experts.h(width))
        if r.used is not None:     # top-p routing: an unused pair has no hidden units, so it spends nothing
            h = h * r.used
        # a policy being fitted: every pair runs at full width and a differentiable prefix mask slims it
        soft_mask = prefix_mask(widths, h, self.experts.hidden) if widths is not None and widths.requires_grad \
            else None
        if r.used is not None:
            y = self.dispatch_used(x, r, h, soft_mask)
        else:
            y = self.dispatch(x, r.expert_idx, r.gates, h, soft_mask=soft_mask)
        spent = pair_flops(C, h.sum(dim=1).float())                        # (N,) expert FLOPs of each token
        pairs = h.numel() if r.used is None else r.used.sum()
        return MoEOutput(self.dropout(y).view(B, T, C), r, spent, h.float().sum() / pairs / self.experts.hidden, h)

    def forward_few(self, x, width, k, top_p=None):
        """forward for a handful of (token, expert) pairs without autograd: what decoding one token needs.
        The same routing, widths and arithmetic, read back to the host once, each pair run on its own row: no
        sort, no buckets, no tensors of per-pair widths and FLOPs. Decoding is overhead-bound (a torch call
        costs microseconds, a token's arithmetic in it hardly more): for one token at k = 2 this is about 100
        torch operator calls, the sorted dispatch about 600. Tested against forward with autograd on."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                            # (N, C), N * k <= n_exp
        r = self.router(x, k, top_p=top_p)
        if isinstance(width, WidthPolicy):
            units = self.experts.h(width(r.gates, self.moe_index)).tolist()   # (N, k) hidden units per pair
        else:
            units = [[self.experts.h(width)] * k] * (B * T)
        if r.used is not None:             # top-p routing: an unused pair has no hidden units and is not run
            units = [[h if u else 0 for h, u in zip(hs, us)] for hs, us in zip(units, r.used.tolist())]
        rows = []
        for n, (experts, gates, hs) in enumerate(zip(r.expert_idx.tolist(), r.gates.tolist(), units)):
            y_n = None
            for e, gate, h in zip(experts, gates, hs):
                if h:                              # (in place: no autograd here, and a float is no tensor)
                    y_e = self.experts(x[n:n + 1], e, h)                   # (1, C)
                    y_n = y_e.mul_(gate) if y_n is None else y_n.add_(y_e, alpha=gate)
            rows.append(y_n)
        y = torch.cat(rows) if len(rows) > 1 else rows[0]                  # (N, C)
        spent = torch.tensor([pair_flops(C, sum(hs)) for hs in units], dtype=torch.float32, device=x.device)
        pairs = sum(h > 0 for hs in units for h in hs)
        mean_width = torch.tensor(sum(map(sum, units)) / pairs / self.experts.hidden, device=x.device)
        return MoEOutput(self.dropout(y).view(B, T, C), r, spent, mean_width, torch.tensor(units))

    def dispatch_used(self, x, r, h, soft_mask=None):
        """Top-p routing: the unused pairs leave the (token, expert) list before the dispatch, which sees each
        used pair as a token of its own with k = 1; the pairs' outputs are added back to their tokens."""
        token, j = r.used.nonzero(as_tuple=True)                           # (M,) each used pair
        pick = lambda t: t[token, j][:, None]                              # (M, 1, ...)
        y = self.dispatch(x[token], pick(r.expert_idx), pick(r.gates), pick(h),
                          **({} if soft_mask is None else dict(soft_mask=pick(soft_mask))))   # (M, C)
        return y.new_zeros(x.size(0), x.size(1)).index_add_(0, token, y)   # (N, C)

    def dispatch(self, x, expert_idx, gates, h, soft_mask=None, by_expert=None):
        """The dispatch forward() runs: dispatch_loop's sort and combine (read that first, it is the
        explanation), but the buckets run in bigger blocks (SlimmableExperts.forward_grouped): on a GPU each
        width as one grouped matmul pair over all experts, on the CPU (by_expert) each expert's widths back
        to back (row_blocks says why). Same result, tested against dispatch_loop and forward_reference in both
        orders, forward and gradients."""
        N, k = expert_idx.shape
        E, H = self.experts.c_fc.size(0), self.experts.hidden
        token = torch.arange(N, device=x.device).repeat_interleave(k)      # (N*k,)
        expert, units, gate = expert_idx.flatten(), h.flatten(), gates.flatten()
        if soft_mask is not None:        # a policy being fitted: every pair at full width, the mask slims
            units = torch.full_like(units, H)
        by_expert = x.device.type == "cpu" if by_expert is None else by_expert
        key = expert * (H + 1) + units if by_expert else units * E + expert   # (expert, width) or (width, expert)
        order = key.argsort(stable=True)                                   # contiguous (width, expert) buckets
        hs, level = torch.unique(units, return_inverse=True)               # (L,) distinct widths, (N*k,) which
        counts = torch.bincount(level * E + expert, minlength=hs.numel() * E).view(-1, E)   # (L, E) bucket sizes
        rows = x[token[order]]                                             # (N*k, C) gathered inputs
        mask = soft_mask.flatten(0, 1)[order] if soft_mask is not None else None   # (N*k, H) same order
        y = self.experts.forward_grouped(rows, counts.tolist(), hs.tolist(), expert[order], mask,  # one host
                                         by_expert)                                                # sync
        y = y * gate[order, None].to(y.dtype)                              # (N*k, C)
        return torch.zeros(N, x.size(1), dtype=y.dtype, device=x.device).index_add_(0, token[order], y)

    def dispatch_loop(self, x, expert_idx, gates, h, soft_mask=None):
        """The dispatch written as a loop over (width, expert) buckets: the readable explanation of
        `dispatch` and its reference in the tests."""
        N, k = expert_idx.shape
        # 1. flatten the (token, expert) pairs
        token = torch.arange(N, device=x.device).repeat_interleave(k)      # (N*k,)
        expert, units, gate = expert_idx.flatten(), h.flatten(), gates.flatten()
        E, H = self.experts.c_fc.size(0), self.experts.hidden
        if soft_mask is not None:          # a policy being fitted: every pair runs at full width, the mask slims
            units = torch.full_like(units, H)
        # 2. sort pairs so each (width, expert) bucket is contiguous: one integer key per pair orders them by
        #    hidden units, then expert (key = units * E + expert; divmod(key, E) gives both back)
        key = units * E + expert
        order = key.argsort(stable=True)
        buckets, counts = torch.unique_consecutive(key[order], return_counts=True)
        rows = x[token[order]]                                             # (N*k, C) gathered inputs
        if soft_mask is not None:
            soft_mask = soft_mask.flatten(0, 1)[order]                     # (N*k, H) in the same order
        # 3. run each bucket: one expert, one width, a contiguous block of rows (one host sync for the loop)
        outs, start = [], 0
        for b, n in zip(buckets.tolist(), counts.tolist()):
            units_b, e = divmod(b, E)
            sl = slice(start, start + n)
            outs.append(self.experts(rows[sl], e, units_b, None if soft_mask is None else soft_mask[sl]))
            start += n
        y = torch.cat(outs)                                                # (N*k, C)
        # 4. combine: weight by the gate and add back to the token each row came from
        y = y * gate[order, None].to(y.dtype)
        return torch.zeros(N, x.size(1), dtype=y.dtype, device=x.device).index_add_(0, token[order], y)


def prefix_mask(widths, h, full, tau=None):
    """Differentiable stand-in for 'keep the first h(w) hidden units', used only while fitting a policy.
    Forward: exactly the hard prefix mask (so the loss is the true loss at those widths). Backward: the
    gradient of a sigmoid ramp of temperature tau hidden units around w * full (straight-through).
    widths: (N, k) with grad; h: (N, k) the hidden units actually kept."""
    tau = tau or max(1.0, 0.025 * full)
    units = torch.arange(full, device=widths.device, dtype=widths.dtype) + 0.5       # (H,) unit centres
    hard = (units < h[..., None]).to(widths.dtype)                                   # (N, k, H)
    soft = torch.sigmoid((widths[..., None] * full - units) / tau)                   # (N, k, H)
    return hard + soft - soft.detach()   # straight-through: the value of `hard`, the gradient of `soft`


# -----------------------------------------------------------------------------
# 6. Width policies: router probabilities -> a width for each (token, expert) pair


class WidthPolicy:
    """A width policy maps the gates of one MoE layer, (N, k), to widths in (0, 1], (N, k).
    Policies know nothing about experts; the dispatch slices by whatever widths they return."""

    def __call__(self, gates, moe_index):
        raise NotImplementedError


class UniformWidth(WidthPolicy):
    """Every selected expert runs at the same width (the static dial)."""

    def __init__(self, width):
        check_width(width)
        self.width = float(width)

    def __call__(self, gates, moe_index):
        return torch.full_like(gates, self.width)

    def __repr__(self):
        return f"UniformWidth({self.width:g})"


class ConfidenceWidth(WidthPolicy):
    """The MoSE router-confidence policy. For a token with selected experts S (|S| = k) and gates p:

        q_i = p_i**gamma / sum_{j in S} p_j**gamma          sharpen, renormalise over S
        w_i = snap( clip(k * Gamma * q_i, w_min, 1) )        share a mean-width budget Gamma

    Two parameters, named as in the paper, that differ only by case:
      gamma  the *sharpness* (an exponent): 0 = ignore the router, 1 = its gates as they are, large = winner takes all
      Gamma  the *budget*: the mean width of a token's k experts before clipping and snapping, since the
             widths k * Gamma * q_i sum to k * Gamma
    gamma = 0 gives every expert width Gamma (clipped and snapped like any width); a large gamma gives the
    budget to the most confident expert. Example, gates (0.7, 0.3), Gamma = 0.5: gamma = 1 gives widths
    (0.70, 0.30); gamma = 2 gives q = (0.84, 0.16), widths (0.85, 0.16 -> clipped to w_min 0.25), a mean of 0.55.
    Because of the clip and the snap to the `grid` the spent FLOPs only approximately follow Gamma: measure
    them (the forward reports them) or use `fit_budget` to move Gamma until they match a target.
    `gamma` is a float, or a tensor with one value per MoE layer (what `fit_ttt` learns)."""

    def __init__(self, gamma=1.0, Gamma=0.5, w_min=0.25, grid=0.05):
        if not Gamma > 0:   # Gamma may exceed 1: after clipping at 1 it takes more to spend a given budget
            raise ValueError(f"Gamma (the mean-width budget) must be > 0, got {Gamma}")
        check_width(w_min, "w_min")
        self.gamma, self.Gamma, self.w_min, self.grid = gamma, float(Gamma), float(w_min), float(grid)

    def gamma_for(self, moe_index):
        g = self.gamma
        return g[moe_index] if isinstance(g, torch.Tensor) and g.dim() > 0 else g

    def __call__(self, gates, moe_index):
        k = gates.size(-1)
        logp = gates.clamp_min(1e-9).log()
        q = torch.softmax(self.gamma_for(moe_index) * logp, dim=-1)   # = p^gamma / sum p^gamma, stable
        w = (k * self.Gamma * q).clamp(self.w_min, 1.0)
        if self.grid:
            w_hard = (torch.round(w / self.grid) * self.grid).clamp(self.w_min, 1.0)   # never below w_min
            w = w + (w_hard - w).detach()                            # straight-through: forward snapped
        return w

    def __repr__(self):
        g = self.gamma.tolist() if isinstance(self.gamma, torch.Tensor) else self.gamma
        return f"ConfidenceWidth(gamma={g}, Gamma={self.Gamma:.4f}, w_min={self.w_min:g}, grid={self.grid:g})"


class RandomWidth(WidthPolicy):
    """A training policy: every (token, expert) pair draws its own width, the full width with probability
    p_full, else uniform in [w_min, 1] snapped to `grid` (0: continuous). One pass then trains many widths at
    once, at less than the cost of a full-width step, and shows the model the mixed widths that the confidence
    policy uses at inference. Draws come from `generator` (a CPU torch.Generator, so a resumed run continues
    the same stream) and are moved to the gates' device."""

    def __init__(self, p_full=0.5, w_min=0.25, grid=0.25, generator=None):
        check_width(w_min, "w_min")
        self.p_full, self.w_min, self.grid, self.generator = float(p_full), float(w_min), float(grid), generator

    def __call__(self, gates, moe_index):
        u = torch.rand((2, *gates.shape), generator=self.generator)            # (2, N, k) on the CPU
        w = self.w_min + (1 - self.w_min) * u[1]
        if self.grid:
            w = (torch.round(w / self.grid) * self.grid).clamp(self.w_min, 1.0)
        return torch.where(u[0] < self.p_full, 1.0, w).to(gates.device)

    def __repr__(self):
        return f"RandomWidth(p_full={self.p_full:g}, w_min={self.w_min:g}, grid={self.grid:g})"


@torch.no_grad()
def expert_flops_fraction(model, policy, batches, k_exp=None, top_p=None):
    """Expert FLOPs spent under `policy` (and top-p routing) on `batches`, as a fraction of full-width expert FLOPs
    at k_exp."""
    spent = sum(model(x, width=policy, k_exp=k_exp, top_p=top_p).stats["expert_flops"].item() for x in batches)
    return spent / (len(batches) * model.flops_breakdown(1.0, k_exp)["experts"])   # both per token, per batch


def calibration_inputs(batches, calib_batches=None):
    """The inputs a fit meets its budget on: `calib_batches` if given, else the first 4 of `batches` [(x, y)]."""
    return calib_batches or [x for x, _ in batches[:4]]


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
    on `calib_batches` (default: the first batches). Returns a ConfidenceWidth."""
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
            loss = model(x, y, width=ConfidenceWidth(gamma(), policy.Gamma, w_min, grid), k_exp=k_exp).loss
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
def calibration_loss(model, batches, width=None, k_exp=None, top_p=None):
    """Mean language-model loss on calibration batches [(x, y)] at a dial (a width, a list, a policy; top-p)."""
    return sum(model(x, y, width=width, k_exp=k_exp, top_p=top_p).loss.item() for x, y in batches) / len(batches)


@torch.no_grad()
def fit_search(model, batches, budget, k_exp=None, w_min=0.25, grid=0.05, gammas=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
               refine=4, calib_batches=None):
    """A gamma that is actually fitted: a 1-D search over gamma on calibration text. Every candidate gets its
    Gamma refitted to the budget (fit_budget on `calib_batches`, default the first 4 batches' inputs) and is
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
def largest_top_p(model, width, batches, limit, k_exp=None):
    """The largest top-p routing mass whose spent expert FLOPs at `width` stay within `limit` (a fraction of the
    full-width expert FLOPs at k_exp) on `batches`. Spend grows with p, so bisection works; the caller has checked
    that one expert per token (p -> 0) fits."""
    lo, hi = 0.0, 1.0
    for _ in range(14):                                        # 14 halvings: p to within 6e-5
        mid = (lo + hi) / 2
        fits = expert_flops_fraction(model, width, batches, k_exp, top_p=max(mid, 1e-6)) <= limit
        lo, hi = (mid, hi) if fits else (lo, mid)
    return max(lo, 1e-6)          # forward takes p > 0; any p below the top probability (>= 1/n_exp) is one expert


@torch.no_grad()
def fit_width_top_p(model, batches, budget, k_exp=None, w_min=0.25, step=0.05, tol=0.01, calib_batches=None):
    """Both dials for one budget: a uniform width and top-p routing. A narrower width costs every token less; top-p
    lets confident tokens skip their weaker experts. The candidates: the widest width on the `step` grid whose k
    experts fit the budget, and every wider width that fits it with top-p routing (up to about k x the budget,
    where one expert per token is left), each with the largest top-p that fits (largest_top_p on `calib_batches`,
    default the first 4 batches' inputs). "Fits" allows `tol` (relative) over the budget. The candidate with the
    lowest LM loss on `batches` wins. Returns (width, top_p); top_p None = all k experts (a uniform width)."""
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
        candidates += [(w, largest_top_p(model, w, calib, limit, k_exp)) for f, w in sizes.items()
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


def make_policy(model, policy="uniform", width=1.0, budget=None, gamma=1.0, k_exp=None, batches=None,
                w_min=0.25, grid=0.05, ttt_lr=0.01, per_layer=False):
    """The compute dial in one call (sample.py and bench_flops.py use it). Returns a width for forward()
    (width_top_p: a width and a top-p).
      uniform:     `width` for every expert; with a budget, the width whose expert FLOPs are that fraction.
      confidence:  ConfidenceWidth(gamma, Gamma=width); with a budget, Gamma is fitted to it on `batches`.
      ttt:         gamma learned on `batches` (a list of (x, y)) for the budget, which it requires.
      search:      gamma searched on `batches`, Gamma refitted to the budget at each candidate (fit_search).
      allocate:    one uniform width per MoE layer, chosen greedily on `batches` for the budget: a list.
      width_top_p: both dials, a uniform width and top-p routing searched on `batches` for the budget
                   (fit_width_top_p): returns (width, top_p), top_p for forward's top_p (None: all k experts).
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
        return p if budget is None else fit_budget(model, p, [x for x, _ in batches], budget, k_exp)
    if policy == "search":
        return fit_search(model, batches, budget, k_exp, w_min, grid)
    if policy == "allocate":
        return allocate_budget(model, batches, budget, k_exp, w_min)[0]
    if policy == "width_top_p":
        return fit_width_top_p(model, batches, budget, k_exp, w_min)
    return fit_ttt(model, batches, budget, k_exp, ttt_lr, per_layer, w_min, grid)


# -----------------------------------------------------------------------------
# 7. Block and GPT


class Block(nn.Module):

    def __init__(self, config, moe_index=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MoSELayer(config, moe_index) if moe_index is not None else MLP(config)

    def forward(self, x, width, k, k_pool, cache=None, top_p=None):
        x = x + self.attn(self.ln_1(x), cache)
        if isinstance(self.mlp, MLP):
            return x + self.mlp(self.ln_2(x)), None
        moe = self.mlp(self.ln_2(x), width, k, k_pool, top_p)                # MoEOutput
        return x + moe.y, moe


class GPTOutput(NamedTuple):
    logits: torch.Tensor      # (B, T, V) with targets; (B, 1, V), the last position only, without
    loss: torch.Tensor        # language-model cross-entropy ONLY (comparable across dense, MoE and MoSE); None
                              # without targets
    router_loss: torch.Tensor  # weighted sum of all router losses; train on loss + router_loss (0 in eval
                               # mode: the router skips them)
    stats: dict               # expert_flops, flops_per_token, mean_width, load and experts_per_token (per MoE layer)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        moe_index = [sum(config.is_moe(j) for j in range(i)) if config.is_moe(i) else None
                     for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=dropout_layer(config.dropout),
            h=nn.ModuleList([Block(config, m) for m in moe_index]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_fc"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02)
            # GPT-2's scaled init of the projections that write into the residual stream (experts too)
            if name.endswith("c_proj.weight") or name.endswith("experts.c_proj"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # the FLOPs outside the experts depend on the config only: counted once, not at every forward (on the
        # CPU: the count is arithmetic, also when the model is being built on the meta device)
        with torch.device("cpu"):
            self.non_expert_flops = self.flops_breakdown()["non_expert"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # --- the dials: validated once, here, so a bad value fails with one clear line ---

    def _per_layer(self, value, name):
        n = self.config.n_moe_layers
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} values, the model has {n} MoE layers")
            return list(value)
        return [value] * n

    def resolve_dials(self, width=None, k_exp=None):
        """width: None (full), a float, a list (one per MoE layer) or a WidthPolicy.
        k_exp: None (training value), an int or a list (one per MoE layer). Returns per-MoE-layer lists."""
        cfg = self.config
        if cfg.n_exp == 0:
            if isinstance(width, WidthPolicy) or (width is not None and width != 1.0):
                raise ValueError("width is a dial of MoE models only; this model is dense (n_exp=0)")
            if k_exp is not None:
                raise ValueError("k_exp is a dial of MoE models only; this model is dense (n_exp=0)")
            return [], []
        widths = [width] * cfg.n_moe_layers if isinstance(width, WidthPolicy) else \
            self._per_layer(1.0 if width is None else width, "width")
        for i, w in enumerate(widths):
            if not isinstance(w, WidthPolicy):
                try:
                    widths[i] = float(w)
                except (TypeError, ValueError):
                    raise ValueError(f"width must be a number in (0, 1], a WidthPolicy, or a list of those (one "
                                     f"per MoE layer); got {w!r}") from None
                check_width(widths[i])
        ks = self._per_layer(cfg.k_exp if k_exp is None else k_exp, "k_exp")
        for k in ks:
            if not (isinstance(k, int) and 1 <= k <= cfg.n_exp):
                raise ValueError(f"k_exp must be an integer in [1, n_exp={cfg.n_exp}], got {k}")
        return widths, ks

    def forward(self, idx, targets=None, width=None, k_exp=None, k_pool=None, kv_cache=None, top_p=None):
        """idx, targets: (B, T) token ids. width / k_exp: the compute dials (see resolve_dials).
        k_pool: Elastic MoE co-activation pool size (training only). kv_cache: from new_kv_cache().
        top_p: Matryoshka MoE top-p routing, each token takes its most probable experts until their mass
        reaches top_p, at least 1 and at most k_exp (in stats: experts_per_token, per MoE layer).
        Returns GPTOutput(logits, loss, router_loss, stats)."""
        B, T = idx.size()
        past = kv_cache[0]["k"].size(2) if kv_cache and kv_cache[0] else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} exceeds block_size {self.config.block_size}")
        widths, ks = self.resolve_dials(width, k_exp)
        if k_pool is not None and not 1 <= k_pool <= self.config.n_exp:
            raise ValueError(f"k_pool must be in [1, n_exp={self.config.n_exp}], got {k_pool}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p is a probability mass in (0, 1], got {top_p}")
        pos_emb = self.transformer.wpe.weight[past:past + T]          # (T, C) positions past .. past + T - 1
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)  # (B, T, C)
        router_loss = x.new_zeros((), dtype=torch.float32)
        spent = torch.zeros(B * T, device=idx.device)                     # expert FLOPs per token
        loads, mean_widths, experts_per_token, pair_widths, pair_experts = [], [], [], [], []
        for i, block in enumerate(self.transformer.h):
            m = block.mlp.moe_index if isinstance(block.mlp, MoSELayer) else None
            x, moe = block(x, widths[m] if m is not None else None, ks[m] if m is not None else None,
                           k_pool, kv_cache[i] if kv_cache is not None else None, top_p)
            if moe is not None:
                routing = moe.routing
                if self.training:                  # in eval mode the routers' losses are zeros: skip the adds
                    router_loss = router_loss + routing.loss
                spent = spent + moe.spent
                loads.append(routing.load)
                mean_widths.append(moe.mean_width)
                pair_widths.append(moe.h.view(B, T, -1).float() / self.config.expert_hidden)   # (B, T, k)
                pair_experts.append(routing.expert_idx.view(B, T, -1))                         # (B, T, k)
                experts_per_token.append(float(ks[m]) if routing.used is None else
                                         routing.used.float().sum(dim=1).mean().item())
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, -1:, :])    # inference: only the last position is needed
            loss = None
        expert_flops = spent.mean().detach()
        stats = dict(expert_flops=expert_flops, load=loads, experts_per_token=experts_per_token,
                     widths=pair_widths, experts=pair_experts,
                     flops_per_token=self.non_expert_flops + expert_flops,
                     mean_width=torch.stack(mean_widths).mean().detach() if mean_widths else torch.ones(()))
        return GPTOutput(logits, loss, router_loss, stats)

    # --- FLOPs ---

    def flops_breakdown(self, width=1.0, k_exp=None, seq_len=None):
        """Analytic forward FLOPs per token (2 per multiply-add), averaged over a causal window of seq_len
        tokens (default block_size). Embedding lookups, norms, softmaxes and GELUs are not counted.
        width/k_exp: float or per-MoE-layer lists (uniform widths; per-token policies report what they
        spent in forward's stats instead)."""
        cfg = self.config
        C, H, T = cfg.n_embd, cfg.expert_hidden, seq_len or cfg.block_size
        if isinstance(width, WidthPolicy):
            raise ValueError("flops_breakdown takes uniform widths; a policy's spent FLOPs are in forward's stats")
        widths, ks = self.resolve_dials(None if width == 1.0 else width, k_exp)
        f = dict(attention=cfg.n_layer * (2 * C * 3 * C + 2 * C * C      # qkv and output projections
                                          + 2 * 2 * C * (T + 1) / 2),     # q.k and att.v over the mean context
                 dense_mlp=(cfg.n_layer - cfg.n_moe_layers) * 2 * 2 * C * 4 * C,
                 router=cfg.n_moe_layers * 2 * C * cfg.n_exp,
                 experts=sum(k * pair_flops(C, hidden_units(w, H, cfg.width_multiple)) for w, k in zip(widths, ks)),
                 lm_head=2 * C * cfg.vocab_size)
        f["non_expert"] = f["attention"] + f["dense_mlp"] + f["router"] + f["lm_head"]
        f["total"] = f["non_expert"] + f["experts"]
        return f

    def flops_per_token(self, width=1.0, k_exp=None, seq_len=None):
        """Forward FLOPs per token of the whole model at a uniform width and k_exp (see flops_breakdown)."""
        return self.flops_breakdown(width, k_exp, seq_len)["total"]

    # --- training and sampling ---

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on matrices (including the 3-D expert stacks), none on biases, norms and 1-D tensors
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decays = lambda n, p: p.dim() >= 2 and not n.endswith(("bias", "b_fc", "b_proj"))
        decay = [p for n, p in params.items() if decays(n, p)]
        no_decay = [p for n, p in params.items() if not decays(n, p)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for every parameter's update (on a CPU 3x faster than the default for-each AdamW,
        # about 5 % of a small model's step); mps keeps the default
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def new_kv_cache(self):
        return [{} for _ in range(self.config.n_layer)]

    @torch.inference_mode()   # no_grad and no autograd bookkeeping at all: 1.12x the tokens/s of no_grad here
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, width=None, k_exp=None,
                 use_cache=True, route_top_p=None, trace=None):
        """Sample max_new_tokens after idx (B, T). top_k is token sampling's; the compute dials are width,
        k_exp and route_top_p (top-p routing: forward's top_p). With use_cache, keys/values are kept between
        steps; once the context outgrows block_size the window slides and the cache is rebuilt each step
        (absolute positions shift), which costs the same as no cache. Returns (idx, mean spent FLOPs/token)."""
        cache, flops, dials = None, [], dict(width=width, k_exp=k_exp, top_p=route_top_p)
        cpu_float32 = idx.device.type == "cpu" and self.lm_head.weight.dtype == torch.float32 \
            and not torch.is_autocast_enabled("cpu")
        with without_onednn(cpu_float32):
            for _ in range(max_new_tokens):
                window = idx[:, -self.config.block_size:]
                if not use_cache or idx.size(1) > self.config.block_size:
                    cache = None
                    out = self(window, **dials)                             # no cache: the whole window
                elif cache is None:
                    cache = self.new_kv_cache()
                    out = self(window, kv_cache=cache, **dials)             # prefill the cache
                else:
                    out = self(idx[:, -1:], kv_cache=cache, **dials)        # one new token
                flops.append(out.stats["flops_per_token"])
                if trace is not None:   # what each step spent, for whoever watches (sample.py --show_widths)
                    trace.append(out.stats)
                logits = out.logits[:, -1, :]
                if temperature != 1.0:
                    logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, -1:], -float("inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                idx = torch.cat((idx, idx_next), dim=1)
        return idx, (torch.stack(flops).mean().item() if flops else 0.0)


@contextlib.contextmanager
def without_onednn(off=True):
    """Switch oneDNN off for a block, then back to what it was. Why, for decoding on the CPU in float32: F.gelu
    runs oneDNN's kernel there, whose set-up costs about 8 µs a call on one token's row against about 1 µs for
    ATen's own kernel (the two agree to 1e-6). A decoded token calls it 6 times in the Shakespeare model, about
    7 % of its time. In float32 nothing else in this model uses oneDNN unless you ask torch for it."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = was and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read with one clear error


def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a crash mid-write leaves the previous checkpoint intact.
    The fsyncs make it hold after a power cut too: without them the rename can reach the disk before the
    data, leaving an empty ckpt.pt in place of both the old and the new one."""
    tmp = f"{path}.tmp"
    try:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)   # atomic on POSIX and Windows
        if os.name == "posix":  # the rename itself lives in the directory
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu"):
    """Returns (model, checkpoint dict). Raises FileNotFoundError / ValueError with a one-line message."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py ...) or fix --out_dir")
    unusable = lambda e: ValueError(f"{path} is not a usable checkpoint ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:120]}); it may be truncated or from another version: "
                                    f"delete it and train again")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)   # optimizer state stays here
    except Exception as e:   # truncated file, not a torch file at all
        raise unusable(e) from None
    # another model family (nanoGPT's checkpoints, a bare state dict) has other model_args, or none
    args = checkpoint.get("model_args") if isinstance(checkpoint, dict) else None
    unknown = sorted(set(args) - set(GPTConfig.__dataclass_fields__)) if isinstance(args, dict) else None
    if unknown is None or unknown or "model" not in checkpoint:
        what = f"model_args {', '.join(unknown)} are not GPTConfig's" if unknown else "it has no model and model_args"
        raise ValueError(f"{path} is not a nanoMoSE checkpoint ({what}): use one written by this repository's "
                         f"train.py; a dense GPT of this repository can be upcycled with --init_from=upcycle:DIR")
    try:
        model = GPT(GPTConfig(**args))
        # a compiled model's state dict has its keys prefixed with _orig_mod.
        state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
        model.load_state_dict(state)
    except Exception as e:   # wrong values, mismatched weights: all one story for the user
        raise unusable(e) from None
    return model.to(device), checkpoint


def check_tokenizer(meta, split_dir):
    """Raise ValueError unless the dataset in split_dir was tokenized as the checkpoint's text was (its
    `meta`): otherwise the same token ids mean other text, and nothing fails, the numbers are just wrong.
    A dataset without meta.pkl says nothing about its tokenizer, and passes."""
    path = os.path.join(split_dir, "meta.pkl")
    if not os.path.exists(path):
        return
    try:
        data = pickle.load(open(path, "rb"))
        same = meta["tokenizer"] == data["tokenizer"] and meta.get("stoi") == data.get("stoi")
    except Exception as e:
        raise ValueError(f"{path} is not a meta.pkl of prepare_data.py ({type(e).__name__}): prepare the data "
                         f"again") from None
    if not same:
        say = lambda m: f"{m['tokenizer']}, vocabulary of {m.get('vocab_size', '?')}"
        raise ValueError(f"the data in {split_dir} has another tokenizer or vocabulary ({say(data)}) than the "
                         f"checkpoint ({say(meta)}): use the dataset it was trained on (--data_dir, --dataset)")
