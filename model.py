"""
nanoMoSE: a GPT whose MoE layers have *slimmable* experts (Mixture of Slimmable Experts, MoSE).

An MoE layer sends each token to the k experts its router scores highest. In MoSE each expert can also run at a
width w in (0, 1]: it then uses only the first h(w) of its hidden units, a prefix of the same weights. Training
shows the model many widths; at inference the width is a dial, one for all experts or one per (token, expert)
pair read from the router's confidence. Read top to bottom:

  1. GPTConfig                    every knob, one line each
  2. CausalSelfAttention, MLP     the dense parts, as in nanoGPT (attention is never slimmed)
  3. Router                       fp32 gate -> softmax -> top-k (or top-p); load-balancing and z losses
  4. hidden_units, pair_flops     h(w), and what one (token, expert) pair costs
     SlimmableExperts             stacked expert weights; a block of rows at one width, every expert at once
  5. MoSELayer                    route -> widths -> sort the pairs by width -> run -> combine (dropless)
  6. Width policies               router probabilities -> a width per pair: uniform, confidence
  7. Block, GPT                   forward with its dials (width, k_exp, route_top_p), FLOPs, generate

Fitting a policy to a FLOPs budget lives in dials.py; how training draws widths and k (with its own, random
policy) in recipes.py; checkpoints, tokenizers and upcycling in checkpoint.py; decoding a token takes
fast_decode.py's path (MoSELayer.forward says where), everything else runs the code below.

References: MoSE (Tastan et al., arXiv 2602.06154); Matryoshka MoE (arXiv 2509.26520); Elastic MoE (arXiv
2509.21892); Switch Transformer (load-balancing loss); ST-MoE (router z-loss); Slimmable Networks (nested
prefix widths); nanoGPT, nanoMoE.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fast_decode   # decoding's speed path (a token's pairs one by one), tested against the plain code here

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
    width_multiple: int = 1         # h(w) is rounded to a multiple of this (16 suits bf16 tensor cores)
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


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.block_size = config.n_head, config.block_size
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        head_size = C // self.n_head
        q, k, v = [t.view(B, T, self.n_head, head_size).transpose(1, 2) for t in (q, k, v)]  # (B, nh, T, head_size)
        if cache is not None:
            # KV cache for generation: keys/values of earlier positions are kept, only new ones computed, in
            # buffers of block_size positions written in place (no copy of the whole past at every token).
            # Either the cache is empty (prefill, causal) or we add one token that sees everything before it.
            n = cache.get("n", 0)                                          # positions filled so far
            if n and T != 1:
                raise ValueError("a filled KV cache takes one token at a time")
            if not n:
                cache["k"], cache["v"] = (k.new_empty(B, self.n_head, self.block_size, head_size)
                                          for _ in range(2))               # (B, nh, block_size, head_size)
            cache["k"][:, :, n:n + T], cache["v"][:, :, n:n + T], cache["n"] = k, v, n + T
            k, v = cache["k"][:, :, :n + T], cache["v"][:, :, :n + T]     # (B, nh, n + T, head_size)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


# -----------------------------------------------------------------------------
# 3. Router


class Routing(NamedTuple):
    expert_idx: torch.Tensor   # (N, k) which experts each token uses
    gates: torch.Tensor        # (N, k) their mixing weights, softmax renormalised over the k selected
    probs: torch.Tensor        # (N, E) router probabilities over all experts
    loss: torch.Tensor         # () weighted sum of this layer's router losses (0 in eval mode)
    load: torch.Tensor         # (E,) fraction of the (token, expert) pairs sent to each expert
    used: torch.Tensor = None  # (N, k) bool, top-p routing only: the pairs a token uses (the others have gate 0
                               # and never run); None = all k are used


class Router(nn.Module):
    """Linear gate in fp32 -> softmax over all experts -> top-k -> gates renormalised over the k.

    fp32 because the softmax over expert logits is sensitive to bf16/fp16 rounding (Switch Transformer). The
    gates are what the width policies read: for the selected experts S of a token, gate_i = p_i / sum_S p_j."""

    def __init__(self, config):
        super().__init__()
        self.n_exp = config.n_exp
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        self.aux_loss_weight = config.aux_loss_weight
        self.z_loss_weight = config.z_loss_weight
        self.hr_loss_weight = config.hr_loss_weight

    def forward(self, x, k, k_pool=None, route_top_p=None):
        # x: (N, C); k: experts per token (with route_top_p: at most); k_pool: Elastic MoE's co-activation pool
        # (training only); route_top_p: Matryoshka MoE's top-p routing, a probability mass in (0, 1]
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.w_g.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)                              # (N, E)
        if k_pool is not None and k_pool > k:
            expert_idx = self.coactivation_sample(probs, k, k_pool)
            top_probs = probs.gather(1, expert_idx)
        else:
            top_probs, expert_idx = probs.topk(k, dim=-1)           # (N, k), most probable first
        used = None
        if route_top_p is not None:
            # a token takes experts in order of probability until their mass (of the softmax over all E) reaches
            # route_top_p (at least one, at most k): pair j is used iff the mass before it is short of route_top_p
            used = top_probs.cumsum(dim=-1) - top_probs < route_top_p    # (N, k)
            used[:, 0] = True
            top_probs = top_probs * used
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True)
        # load: the fraction of used (token, expert) pairs that went to each expert (1/E each when balanced);
        # unused pairs go to an extra bin E that is dropped
        pairs = expert_idx if used is None else expert_idx.masked_fill(~used, self.n_exp)
        n_pairs = expert_idx.numel() if used is None else used.sum()
        load = torch.bincount(pairs.flatten(), minlength=self.n_exp + 1)[:self.n_exp].float() / n_pairs
        if not self.training:   # the losses are a training objective
            return Routing(expert_idx, gates, probs, logits.new_zeros(()), load, used)
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


def hidden_units(width, H, multiple=1):
    """h(w): the leading hidden units an expert of H runs at width w, rounded to the nearest multiple of `multiple`,
    at least one multiple, at most H. A float or a tensor of widths, with the same float32 rounding for both."""
    if not isinstance(width, torch.Tensor):
        h = np.round(np.float32(width) * np.float32(H) / np.float32(multiple))   # half to even, as torch
        return int(min(max(h * multiple, multiple), H))
    w = width.float()                          # float32 on every device (mps has no float64)
    return (torch.round(w * H / multiple) * multiple).clamp(min=multiple, max=H).long()


def pair_flops(n_embd, h):
    """Forward FLOPs of one (token, expert) pair at h hidden units: (1 x C) @ (C x h) and (1 x h) @ (h x C),
    2 FLOPs per multiply-add. The one place this constant lives."""
    return 4 * n_embd * h


def check_width(width, name="width"):
    if not 0.0 < width <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {width}")


def expert_matmul(x, w, counts):
    """x (n, K): rows sorted by expert, counts[e] of them for expert e; w (E, K, M). Each expert's rows times its
    own matrix: (n, M). One F.grouped_mm where that kernel runs (the CPU; CUDA in bf16 from compute capability
    8.0; it needs every row to be a multiple of 16 bytes: in fp32 h a multiple of 4), else a loop over the
    experts that have rows. Both compute the same."""
    if hasattr(F, "grouped_mm") and x.stride(0) * x.element_size() % 16 == 0 and \
            w.stride(1) * w.element_size() % 16 == 0 and w.size(2) * w.element_size() % 16 == 0 and \
            (x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16
                                        and torch.cuda.get_device_capability(x.device) >= (8, 0))):
        ends = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)   # where each expert's rows end
        return F.grouped_mm(x, w, offs=ends)
    # unbind, not w[e]: one backward node for all experts instead of a zero-filled gradient per expert
    return torch.cat([rows @ w_e for rows, w_e, n in zip(x.split(counts), w.unbind(0), counts) if n])


class SlimmableExperts(nn.Module):
    """All experts of a layer as stacked weights. Expert e at width w is the GELU FFN

        y = gelu(x @ c_fc[e, :, :h] + b_fc[e, :h]) @ c_proj[e, :h, :] + b_proj[e],   h = h(w)

    a nested prefix of its hidden units: every width shares the same weights, width 1 is a standard MoE expert,
    and a narrow expert really does less arithmetic (a slice, not a mask). The first hidden units are trained
    by every width, so they come to carry the most."""

    def __init__(self, config):
        super().__init__()
        E, C, H = config.n_exp, config.n_embd, config.expert_hidden
        self.H, self.multiple = H, config.width_multiple
        self.c_fc = nn.Parameter(torch.empty(E, C, H))
        self.c_proj = nn.Parameter(torch.empty(E, H, C))
        self.b_fc = nn.Parameter(torch.zeros(E, H)) if config.bias else None
        self.b_proj = nn.Parameter(torch.zeros(E, C)) if config.bias else None

    def hidden_units(self, width):   # h(w) of these experts
        return hidden_units(width, self.H, self.multiple)

    def forward(self, x, expert, counts, h, mask=None):
        """Rows of one width, every expert at once. x (n, C): rows sorted by expert; expert (n,): each row's expert;
        counts: rows per expert (E ints); h: the hidden units they run; mask (n, H): fitting's soft mask (h = H)."""
        # F.grouped_mm is not on autocast's list of ops: cast as autocast would cast a matmul
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        a = expert_matmul(x.to(dtype), self.c_fc[:, :, :h].to(dtype), counts)             # (n, h)
        if self.b_fc is not None:
            a = a + self.b_fc[expert, :h].to(a.dtype)
        a = F.gelu(a)
        if mask is not None:
            a = a * mask[:, :h].to(a.dtype)
        y = expert_matmul(a.to(dtype), self.c_proj[:, :h, :].to(dtype), counts)           # (n, C)
        return y + self.b_proj[expert].to(y.dtype) if self.b_proj is not None else y

    @torch.no_grad()
    def reorder_hidden_units_(self, importance):
        """Permute each expert's hidden units so the most important come first (importance: (E, H)). Every
        expert's function at full width is unchanged; the narrow prefixes get the best units (upcycling)."""
        order = importance.argsort(dim=1, descending=True)                 # (E, H)
        self.c_fc.copy_(self.c_fc.gather(2, order[:, None, :].expand_as(self.c_fc)))
        self.c_proj.copy_(self.c_proj.gather(1, order[:, :, None].expand_as(self.c_proj)))
        if self.b_fc is not None:
            self.b_fc.copy_(self.b_fc.gather(1, order))


# -----------------------------------------------------------------------------
# 5. The MoSE layer: dropless, sort-based dispatch


class MoSEOutput(NamedTuple):
    """What one MoSE layer hands back up to GPT.forward."""
    y: torch.Tensor            # (B, T, C) the layer's output
    routing: Routing           # the router's decisions and losses
    h: torch.Tensor            # (N, k) hidden units each (token, expert) pair ran (0: not run, top-p routing)
    spent: torch.Tensor        # (N,) expert FLOPs each token spent in this layer


class MoSELayer(nn.Module):
    """Route -> a width for every (token, expert) pair -> sort the pairs by width -> run each width's rows on
    all experts at once -> add back to the tokens, weighted by the gates. No capacity, no dropped tokens: a
    token's output never depends on which other tokens share its batch."""

    def __init__(self, config, moe_index):
        super().__init__()
        self.moe_index = moe_index         # index among the MoE layers (a policy may hold one gamma per layer)
        self.router = Router(config)
        self.experts = SlimmableExperts(config)
        self.dropout = nn.Dropout(config.dropout)
        self.use_fast = True               # decode with fast_decode.py's path (GPT.set_fast)

    def forward(self, x, width=1.0, k=2, k_pool=None, route_top_p=None, fitting=False):
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                            # (N, C)
        if self.use_fast and not torch.is_grad_enabled() and B * T * k <= self.router.n_exp:
            # a handful of pairs without autograd: what decoding a token with the KV cache looks like
            r, _, h = self.route(x, width, k, route_top_p=route_top_p)
            y = fast_decode.decode_moe(self.experts, x, r.expert_idx, r.gates, h)   # (N, C)
        else:
            r, widths, h = self.route(x, width, k, k_pool, route_top_p)
            # fitting (dials.fit_ttt): every pair runs at full width behind a differentiable prefix mask, so the loss
            # has a gradient in the widths; wall time is full width's, while spent (below) counts the hard widths' FLOPs
            soft_mask = prefix_mask(widths, h, self.experts.H) if fitting and widths is not None else None
            y = self.dispatch(x, r.expert_idx, r.gates, h, soft_mask=soft_mask)   # (N, C)
        spent = pair_flops(C, h.sum(dim=1).float())                        # (N,) expert FLOPs of each token
        return MoSEOutput(self.dropout(y).view(B, T, C), r, h, spent)

    def route(self, x, width, k, k_pool=None, route_top_p=None):
        """x (N, C) -> the router's choices, the policy's widths (N, k; None for one width for all) and the hidden
        units each (token, expert) pair runs, h (N, k). The policy reads the gates but never trains the router."""
        r = self.router(x, k, k_pool, route_top_p)
        widths = None
        if isinstance(width, WidthPolicy):
            widths = width(r.gates.detach(), self.moe_index)               # (N, k)
            h = self.experts.hidden_units(widths.detach())                 # (N, k)
        else:
            h = torch.full_like(r.expert_idx, self.experts.hidden_units(width))   # (N, k) one width for all
        if r.used is not None:             # top-p routing: an unused pair has no hidden units, runs nothing
            h = h * r.used
        return r, widths, h

    def dispatch(self, x, expert_idx, gates, h, soft_mask=None):
        """x (N, C); expert_idx, gates, h (N, k): each pair's expert, gate and h; soft_mask (N, k, H): fitting's."""
        N, k = expert_idx.shape
        E, H = self.experts.c_fc.size(0), self.experts.H
        # 1. one row per (token, expert) pair
        token = torch.arange(N, device=x.device).repeat_interleave(k)      # (N*k,)
        expert, h, gate = expert_idx.flatten(), h.flatten(), gates.flatten()   # (N*k,) each
        if soft_mask is not None:          # a policy being fitted: every pair at full width, the mask slims
            h = torch.where(h > 0, H, 0)
        # 2. sort the pairs by (h, expert): each width's rows are contiguous, within a width each expert's, so
        #    one grouped matmul pair runs a width on all its experts
        key = h * E + expert                                               # (N*k,)
        order = key.argsort(stable=True)                                   # (N*k,)
        counts = torch.bincount(key, minlength=(H + 1) * E).view(H + 1, E)  # (H+1, E) pairs per (h, expert)
        distinct = counts.sum(dim=1).nonzero().flatten()                   # the distinct values of h
        plan = list(zip(distinct.tolist(), counts[distinct].tolist()))     # [(h, rows per expert)]: one host sync
        # pairs that top-p routing left out have h = 0 and sort first: skip them
        skip = sum(plan.pop(0)[1]) if plan[0][0] == 0 else 0
        order = order[skip:]
        token, expert, gate = token[order], expert[order], gate[order]     # (pairs,) each, sorted
        rows = x[token]                                                    # (pairs, C) gathered inputs
        mask = None if soft_mask is None else soft_mask.flatten(0, 1)[order]   # (pairs, H)
        # 3. run each width on all its experts
        sizes = [sum(c) for _, c in plan]
        masks = mask.split(sizes) if mask is not None else [None] * len(plan)
        y = torch.cat([self.experts(r, e, c, h, m) for (h, c), r, e, m in
                       zip(plan, rows.split(sizes), expert.split(sizes), masks)])   # (pairs, C)
        # 4. combine: add each row back to its token, weighted by its gate
        y = y * gate[:, None].to(y.dtype)
        return torch.zeros(N, x.size(1), dtype=y.dtype, device=x.device).index_add_(0, token, y)


def prefix_mask(widths, h, H, tau=None):
    """Differentiable stand-in for 'keep the first h(w) hidden units', used only while fitting a policy.
    Forward: exactly the hard prefix mask (so the loss is the true loss at those widths). Backward: the
    gradient of a sigmoid ramp of temperature tau hidden units around w * H (straight-through)."""
    tau = tau or max(1.0, 0.025 * H)   # a few units: the gradient sees the units near the edge, not the row
    centres = torch.arange(H, device=widths.device, dtype=widths.dtype) + 0.5        # (H,) unit centres
    hard = (centres < h[..., None]).to(widths.dtype)                                 # (N, k, H)
    soft = torch.sigmoid((widths[..., None] * H - centres) / tau)                    # (N, k, H)
    return hard + soft - soft.detach()   # the value of `hard`, the gradient of `soft`


# -----------------------------------------------------------------------------
# 6. Width policies: router gates -> a width for each (token, expert) pair


class WidthPolicy:
    """Maps the gates of one MoE layer, (N, k), to widths in (0, 1], (N, k). Policies know nothing about
    experts; the dispatch slices by whatever widths they return."""

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
    """MoSE's router-confidence policy. For a token with selected experts S (|S| = k) and gates p:

        q_i = p_i**gamma / sum_{j in S} p_j**gamma          sharpen, renormalise over S
        w_i = snap( clip(k * Gamma * q_i, w_min, 1) )        share a mean-width target Gamma

      gamma  the *sharpness*: 0 = ignore the router, 1 = its gates as they are, large = winner takes all
      Gamma  the *mean-width target*: the mean width of a token's k experts before clipping and snapping
    Example, gates (0.7, 0.3), Gamma = 0.5: gamma = 1 gives widths (0.70, 0.30); gamma = 2 gives q = (0.84,
    0.16), widths (0.85, 0.16 -> clipped to w_min 0.25), a mean of 0.55. The clip and the snap to `grid` make
    the spent FLOPs follow Gamma only approximately: dials.fit_budget moves Gamma until they meet a budget.
    `gamma` is a float, or a tensor with one value per MoE layer (what dials.fit_ttt learns)."""

    def __init__(self, gamma=1.0, Gamma=0.5, w_min=0.25, grid=0.05):
        if not Gamma > 0:   # Gamma may exceed 1: after clipping at 1 it takes more to spend a given fraction
            raise ValueError(f"Gamma (the mean-width target) must be > 0, got {Gamma}")
        check_width(w_min, "w_min")
        self.gamma, self.Gamma, self.w_min, self.grid = gamma, float(Gamma), float(w_min), float(grid)

    def __call__(self, gates, moe_index):
        k, gamma = gates.size(-1), self.gamma
        if isinstance(gamma, torch.Tensor) and gamma.dim() > 0:
            gamma = gamma[moe_index]
        q = torch.softmax(gamma * gates.clamp_min(1e-9).log(), dim=-1)   # = p^gamma / sum p^gamma, stable
        w = (k * self.Gamma * q).clamp(self.w_min, 1.0)
        if self.grid:
            w_hard = (torch.round(w / self.grid) * self.grid).clamp(self.w_min, 1.0)
            w = w + (w_hard - w).detach()                            # straight-through: forward snapped
        return w

    def __repr__(self):
        g = self.gamma.tolist() if isinstance(self.gamma, torch.Tensor) else self.gamma
        return f"ConfidenceWidth(gamma={g}, Gamma={self.Gamma:.4f}, w_min={self.w_min:g}, grid={self.grid:g})"


# -----------------------------------------------------------------------------
# 7. Block and GPT


class Block(nn.Module):

    def __init__(self, config, moe_index=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        # 'mlp' as in nanoGPT, also for a MoSE layer: checkpoints' keys (h.0.mlp.experts.c_fc) keep nanoGPT's names
        self.mlp = MoSELayer(config, moe_index) if moe_index is not None else MLP(config)

    def forward(self, x, width, k, k_pool, cache=None, route_top_p=None, fitting=False):
        x = x + self.attn(self.ln_1(x), cache)
        if isinstance(self.mlp, MLP):
            return x + self.mlp(self.ln_2(x)), None
        moe = self.mlp(self.ln_2(x), width, k, k_pool, route_top_p, fitting)   # MoSEOutput
        return x + moe.y, moe


class GPTOutput(NamedTuple):
    logits: torch.Tensor       # (B, T, V) with targets; (B, 1, V), the last position only, without
    loss: torch.Tensor         # language-model cross-entropy only (comparable across dense, MoE and MoSE);
                               # None without targets
    router_loss: torch.Tensor  # weighted sum of all router losses: train on loss + router_loss (0 in eval mode)
    stats: dict                # what was spent, see GPT.forward


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        moe_index = [sum(config.is_moe(j) for j in range(i)) if config.is_moe(i) else None
                     for i in range(config.n_layer)]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, m) for m in moe_index]),   # the blocks (nanoGPT's name; not an h(w))
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_fc"):      # the expert stacks (torch.empty): their only initialisation
                torch.nn.init.normal_(p, mean=0.0, std=0.02)
            # GPT-2's scaled init of the projections that write into the residual stream (experts too)
            if name.endswith("c_proj.weight") or name.endswith("experts.c_proj"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.device("cpu"):   # arithmetic on the config only, also when built on the meta device
            self.non_expert_flops = self.flops_breakdown()["non_expert"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def set_fast(self, on=True):
        """fast_decode.py's path on (the default) or off (only the plain code of this file runs)."""
        for m in self.modules():
            if isinstance(m, MoSELayer):
                m.use_fast = on

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def resolve_dials(self, width=None, k_exp=None):
        """width: None (full), a float, a WidthPolicy, or a list of those (one per MoE layer). k_exp: None (the
        training value), an int or a list. Returns two per-MoE-layer lists; a bad value is one clear line."""
        cfg, n = self.config, self.config.n_moe_layers
        if cfg.n_exp == 0:
            if isinstance(width, WidthPolicy) or (width is not None and width != 1.0) or k_exp is not None:
                raise ValueError("width and k_exp are dials of MoE models only; this model is dense (n_exp=0)")
            return [], []
        per_layer = {}
        for name, value in (("width", 1.0 if width is None else width), ("k_exp", cfg.k_exp if k_exp is None
                                                                         else k_exp)):
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ValueError(f"{name} has {len(value)} values, the model has {n} MoE layers")
            per_layer[name] = list(value) if isinstance(value, (list, tuple)) else [value] * n
        widths, ks = per_layer["width"], per_layer["k_exp"]
        for i, w in enumerate(widths):
            if not isinstance(w, WidthPolicy):
                try:
                    widths[i] = float(w)
                except (TypeError, ValueError):
                    raise ValueError(f"width must be a number in (0, 1], a WidthPolicy, or a list of those (one "
                                     f"per MoE layer); got {w!r}") from None
                check_width(widths[i])
        for k in ks:
            if not (isinstance(k, int) and 1 <= k <= cfg.n_exp):
                raise ValueError(f"k_exp must be an integer in [1, n_exp={cfg.n_exp}], got {k}")
        return widths, ks

    def forward(self, idx, targets=None, width=None, k_exp=None, k_pool=None, kv_cache=None, route_top_p=None,
                fitting=False):
        """idx, targets: (B, T) token ids. The compute dials: width and k_exp (see resolve_dials); route_top_p,
        Matryoshka MoE's top-p routing (each token takes its most probable experts until their mass reaches
        route_top_p, at most k_exp). k_pool: Elastic MoE's co-activation pool (training). kv_cache: new_kv_cache().
        fitting: dials.fit_ttt fits a policy's gamma (every pair at full width behind a soft mask: MoSELayer).
        stats: expert_flops and flops_per_token (spent, mean per token), mean_width of the pairs that ran, and per
        MoE layer: load, experts_per_token, and for every (token, expert) pair (B, T, k) its expert and ran_width,
        the width it ran at, h/H (the rounding of h(w) included, so not quite the width asked for; 0 = not run)."""
        B, T = idx.size()
        past = kv_cache[0].get("n", 0) if kv_cache else 0                 # positions already in the cache
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} exceeds block_size {self.config.block_size}")
        widths, ks = self.resolve_dials(width, k_exp)
        if k_pool is not None and not 1 <= k_pool <= self.config.n_exp:
            raise ValueError(f"k_pool must be in [1, n_exp={self.config.n_exp}], got {k_pool}")
        if route_top_p is not None and not 0 < route_top_p <= 1:
            raise ValueError(f"route_top_p is a probability mass in (0, 1], got {route_top_p}")
        pos_emb = self.transformer.wpe.weight[past:past + T]              # (T, C) positions past .. past+T-1
        x = self.transformer.drop(self.transformer.wte(idx) + pos_emb)   # (B, T, C)
        router_loss = x.new_zeros((), dtype=torch.float32)
        spent = torch.zeros(B * T, device=idx.device)                     # (B*T,) expert FLOPs per token
        stats = dict(load=[], experts_per_token=[], ran_width=[], experts=[])
        for i, block in enumerate(self.transformer.h):
            m = block.mlp.moe_index if isinstance(block.mlp, MoSELayer) else None
            x, moe = block(x, widths[m] if m is not None else None, ks[m] if m is not None else None,
                           k_pool, kv_cache[i] if kv_cache is not None else None, route_top_p, fitting)
            if moe is not None:
                router_loss = router_loss + moe.routing.loss
                spent = spent + moe.spent
                stats["load"].append(moe.routing.load)
                stats["experts_per_token"].append((moe.h > 0).sum(dim=1).float().mean().item() if route_top_p
                                                  else float(ks[m]))
                stats["ran_width"].append(moe.h.view(B, T, -1).float() / block.mlp.experts.H)       # (B, T, k) h/H
                stats["experts"].append(moe.routing.expert_idx.view(B, T, -1))                     # (B, T, k)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, -1:, :])    # inference: only the last position is needed
            loss = None
        stats["expert_flops"] = spent.mean().detach()
        stats["flops_per_token"] = self.non_expert_flops + stats["expert_flops"]
        pairs = torch.cat([w.flatten() for w in stats["ran_width"]]) if stats["ran_width"] else torch.ones(1)
        stats["mean_width"] = pairs.sum() / (pairs > 0).sum()          # over the pairs that ran
        return GPTOutput(logits, loss, router_loss, stats)

    # --- FLOPs ---

    def flops_breakdown(self, width=1.0, k_exp=None, seq_len=None):
        """Analytic forward FLOPs per token (2 per multiply-add), averaged over a causal window of seq_len
        tokens (default block_size). Embedding lookups, norms, softmaxes and GELUs are not counted.
        width/k_exp: uniform, a float or one per MoE layer (a per-token policy's spent FLOPs are in forward's
        stats). Returns attention, dense_mlp, router, experts, lm_head, non_expert and total."""
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
        # weight decay on matrices (the 3-D expert stacks too), none on biases, norms and other 1-D tensors
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decays = lambda n, p: p.dim() >= 2 and not n.endswith(("bias", "b_fc", "b_proj"))
        groups = [{"params": [p for n, p in params.items() if decays(n, p)], "weight_decay": weight_decay},
                  {"params": [p for n, p in params.items() if not decays(n, p)], "weight_decay": 0.0}]
        # fused: one kernel for every parameter's update (on a CPU 3x faster than the for-each AdamW)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def new_kv_cache(self):
        return [{} for _ in range(self.config.n_layer)]   # one per layer, filled by CausalSelfAttention

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, width=None, k_exp=None,
                 use_cache=True, route_top_p=None, trace=None):
        """Sample max_new_tokens after idx (B, T). top_k is token sampling's; the compute dials are width, k_exp and
        route_top_p. Each step conditions on a window of the text at positions 0, 1, ...: first the prompt's last
        block_size tokens, then one more token a step until the window would outgrow block_size, when it restarts from
        its last block_size // 2 tokens. So every token is predicted from block_size // 2 to block_size tokens (fewer
        only after a short prompt). With use_cache a step computes only the new token's keys and values, and a restart
        refills the cache from the half window; use_cache=False recomputes the whole window every step, the reference
        the cache is tested against. trace: a list that receives each step's stats. Returns (idx, the mean over the
        steps of the FLOPs per token each step's forward spent; a refill is one step, at its tokens' mean)."""
        block, dials = self.config.block_size, dict(width=width, k_exp=k_exp, route_top_p=route_top_p)
        start, cache, flops = max(0, idx.size(1) - block), None, []
        with without_onednn(idx.device.type == "cpu" and not torch.is_autocast_enabled("cpu")):
            for _ in range(max_new_tokens):
                if idx.size(1) - start > block:                         # the window is full: keep its last half
                    start, cache = idx.size(1) - max(1, block // 2), None
                if cache is not None:
                    out = self(idx[:, -1:], kv_cache=cache, **dials)    # one new token
                else:
                    cache = self.new_kv_cache() if use_cache else None
                    out = self(idx[:, start:], kv_cache=cache, **dials)   # the whole window (fills the cache)
                flops.append(out.stats["flops_per_token"])
                if trace is not None:
                    trace.append(out.stats)
                logits = out.logits[:, -1, :] / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, -1:], -float("inf"))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
                idx = torch.cat((idx, idx_next), dim=1)
        return idx, (torch.stack(flops).mean().item() if flops else 0.0)


@contextlib.contextmanager
def without_onednn(off=True):
    """oneDNN off for a block, then back as it was. Why, for decoding on the CPU in float32: F.gelu runs oneDNN's
    kernel there, whose set-up costs about 6 µs a call on one token's row against about 1 µs for ATen's own (the
    two agree to 1e-6); nothing else in this model uses oneDNN in float32. About a tenth of a token's decoding time
    on the Shakespeare model."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = was and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was
