"""
Speed paths for two things model.py's plain code does slowly, each held to the plain code by test_dispatch.py
(forward and gradients). model.py takes them where `MoSELayer.fast` is on (the default; GPT.set_fast(False)
runs the plain code alone), the way nanoGPT takes flash attention where torch has it.

  decode_moe         decoding one token: its k (token, expert) pairs one by one, read back to the host once.
                     The plain dispatch sorts, counts and gathers, about 40 small torch calls per MoE layer
                     for two pairs; decoding is bound by that overhead, not by arithmetic.
  SlimmableFFN       training: the experts of every width in one autograd Function with its backward written
                     out. Autograd's backward of a weight slice w[:, :, :h] builds a zero-filled gradient of the
                     whole weight for every distinct width and then adds it into the weight's gradient; here each
                     width adds its part straight into one buffer.

What each saves end to end is measured by `python bench_speed.py --parts=fast` (README, RESULTS.md).
"""

import torch
import torch.nn.functional as F

import model


# -----------------------------------------------------------------------------
# decoding


def decode_moe(layer, x, width, k, top_p=None):
    """MoSELayer.forward for a few tokens without autograd (N * k <= n_exp): the same routing, widths and
    arithmetic, each (token, expert) pair on its own row. Returns model.MoEOutput."""
    B, T, C = x.shape
    x = x.reshape(B * T, C)                                            # (N, C)
    r = layer.router(x, k, top_p=top_p)
    if isinstance(width, model.WidthPolicy):
        h = layer.experts.h(width(r.gates, layer.moe_index))          # (N, k)
    else:
        h = torch.full_like(r.expert_idx, layer.experts.h(width))
    if r.used is not None:                                             # top-p routing: unused pairs run nothing
        h = h * r.used
    ex, rows = layer.experts, []
    for n, (experts, gates, units) in enumerate(zip(r.expert_idx.tolist(), r.gates.tolist(), h.tolist())):
        y_n = None
        for e, gate, u in zip(experts, gates, units):
            if not u:
                continue
            a = x[n:n + 1] @ ex.c_fc[e, :, :u]                         # (1, u): SlimmableExperts' formula
            if ex.b_fc is not None:                                    # for one row (in place: no autograd)
                a += ex.b_fc[e, :u]
            y_e = F.gelu(a) @ ex.c_proj[e, :u, :]                      # (1, C)
            if ex.b_proj is not None:
                y_e += ex.b_proj[e]
            y_n = y_e.mul_(gate) if y_n is None else y_n.add_(y_e, alpha=gate)
        rows.append(y_n)
    y = torch.cat(rows) if len(rows) > 1 else rows[0]                  # (N, C)
    spent = model.pair_flops(C, h.sum(dim=1).float())                  # (N,)
    return model.MoEOutput(layer.dropout(y).view(B, T, C), r, h, spent)


# -----------------------------------------------------------------------------
# training


def weight_grad_(g, x, dy, counts, grouped):
    """Add each expert's weight gradient in place: g[e] += x_e^T @ dy_e over its rows (g may be a slice of a
    bigger buffer). On a GPU one grouped matmul; on the CPU expert by expert, BLAS adding into the slice."""
    if grouped:
        g.add_(F.grouped_mm(x.t(), dy, offs=torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)))
        return
    for ge, xe, de in zip(g.unbind(0), x.split(counts), dy.split(counts)):
        if len(xe):
            if ge.dtype == xe.dtype:
                ge.addmm_(xe.t(), de)
            else:   # bf16 / fp16 activations into the fp32 gradient
                ge.add_(xe.t() @ de)


class SlimmableFFN(torch.autograd.Function):
    """The experts of all widths: the forward is SlimmableExperts.forward width by width, the backward is written
    out so that every width adds its weight gradient into one buffer. blocks: [(h, counts)] in row order."""

    @staticmethod
    def forward(ctx, x, c_fc, b_fc, c_proj, b_proj, mask, blocks, expert, dtype):
        x, w_fc, w_proj = x.to(dtype), c_fc.to(dtype), c_proj.to(dtype)
        outs, kept, start = [], [], 0
        for h, counts in blocks:
            sl = slice(start, start + sum(counts))
            pre = model.expert_matmul(x[sl], w_fc[:, :, :h], counts)                        # (n, h)
            if b_fc is not None:
                pre = pre + b_fc[expert[sl], :h].to(dtype)
            a = F.gelu(pre)
            y = model.expert_matmul(a if mask is None else a * mask[sl, :h].to(dtype), w_proj[:, :h, :], counts)
            outs.append(y + b_proj[expert[sl]].to(dtype) if b_proj is not None else y)    # (n, C)
            kept += [pre, a]               # what autograd keeps: pre for gelu's backward, a for c_proj's
            start = sl.stop
        ctx.save_for_backward(x, w_fc, w_proj, mask, expert, *kept)
        ctx.blocks, ctx.param_dtype = blocks, c_fc.dtype
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, gy):
        x, w_fc, w_proj, mask, expert, *saved = ctx.saved_tensors
        need_x, need_fc, need_bfc, need_proj, need_bproj, need_mask = ctx.needs_input_grad[:6]   # fit_ttt: frozen
        gy = gy.to(x.dtype).contiguous()
        acc = torch.promote_types(ctx.param_dtype, torch.float32)   # bf16 weights: sum their gradients in fp32
        zeros = lambda *shape: torch.zeros(shape, dtype=acc, device=x.device)
        g_fc = zeros(*w_fc.shape) if need_fc else None
        g_proj = zeros(*w_proj.shape) if need_proj else None
        g_bfc = zeros(w_fc.shape[0], w_fc.shape[2]) if need_bfc else None
        g_mask = torch.zeros_like(mask) if mask is not None and need_mask else None
        gx, start = torch.empty_like(x) if need_x else None, 0
        on_gpu = x.device.type != "cpu" and hasattr(F, "grouped_mm")
        for (h, counts), pre, a in zip(ctx.blocks, saved[0::2], saved[1::2]):
            sl = slice(start, start + pre.size(0))
            start = sl.stop
            if g_proj is not None:                                                     # c_proj[e, :h] += a^T gy
                am = a * mask[sl, :h].to(a.dtype) if mask is not None else a
                weight_grad_(g_proj[:, :h, :], am, gy[sl], counts, on_gpu)
            if not (need_x or need_fc or need_bfc or g_mask is not None):
                continue
            ga = model.expert_matmul(gy[sl], w_proj[:, :h, :].transpose(1, 2), counts)   # (n, h)
            if mask is not None:
                if g_mask is not None:
                    g_mask[sl, :h] = (ga * a).to(g_mask.dtype)
                ga = ga * mask[sl, :h].to(ga.dtype)
            gpre = torch.ops.aten.gelu_backward(ga, pre)                               # (n, h)
            if g_fc is not None:                                                       # c_fc[e, :, :h] += x^T gpre
                weight_grad_(g_fc[:, :, :h], x[sl], gpre, counts, on_gpu)
            if g_bfc is not None:
                g_bfc[:, :h].index_add_(0, expert[sl], gpre.to(acc))
            if gx is not None:
                gx[sl] = model.expert_matmul(gpre, w_fc[:, :, :h].transpose(1, 2), counts)   # (n, C)
        g_bproj = zeros(w_proj.shape[0], w_proj.shape[2]).index_add_(0, expert, gy.to(acc)) if need_bproj else None
        cast = lambda g: None if g is None else g.to(ctx.param_dtype)
        return gx, cast(g_fc), cast(g_bfc), cast(g_proj), cast(g_bproj), g_mask, None, None, None


def run_widths(experts, rows, expert, blocks, mask=None):
    """What MoSELayer.dispatch's loop over widths computes (rows sorted by width, then expert; blocks [(h,
    counts)]), as one SlimmableFFN. Returns (rows, C)."""
    dev = rows.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else rows.dtype
    return SlimmableFFN.apply(rows, experts.c_fc, experts.b_fc, experts.c_proj, experts.b_proj, mask, blocks,
                              expert, dtype)
