"""
The one speed path that earns its lines: decoding a token. model.py's dispatch sorts, counts and gathers the
(token, expert) pairs, dozens of small torch calls per MoE layer, and decoding one token is bound by exactly that
overhead, not by arithmetic. decode_moe runs a token's k pairs one by one instead, from the routing read back to
the host once. model.py takes it where `MoSELayer.use_fast` is on (the default; GPT.set_fast(False) runs the plain
code alone), the way nanoGPT takes flash attention where torch has it; test_dispatch.py holds it to the plain
code. `python bench_speed.py --parts=fast` measures what it saves end to end (README, RESULTS.md): 1.4-1.6x the
tokens/s of the Shakespeare model on a CPU. Training runs the plain dispatch: a written-out backward saved 7 %
of a random_pair step (OpenWebText-small, CPU), under the 10 % that would pay for its 100 lines, and was dropped.
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
    r, _, h = layer.route(x, width, k, top_p=top_p)                   # h (N, k): 0 = not run (top-p routing)
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
