"""
The one speed path that earns its lines: decoding a token. model.py's dispatch sorts, counts and gathers the
(token, expert) pairs, dozens of small torch calls per MoE layer, and decoding one token is bound by exactly that
overhead, not by arithmetic. decode_moe runs a token's k pairs one by one instead, from the routing read back to
the host once. model.py takes it where `MoSELayer.use_fast` is on (the default; GPT.set_fast(False) runs the plain
code alone), the way nanoGPT takes flash attention where torch has it; test_dispatch.py holds it to the plain
code. `python bench_speed.py --parts=fast` measures what it saves: 1.3-1.4x the tokens/s of the Shakespeare model
over sample.py's 500 tokens on a CPU. Training runs the plain dispatch: a written-out backward would save 7 % of a
random_pair step (OpenWebText-small, CPU), under the 10 % that would pay for its 100 lines, so it is not here.
"""

import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# decoding


def decode_moe(experts, x, expert_idx, gates, h):
    """MoSELayer.dispatch for a few tokens without autograd (N * k <= n_exp), each (token, expert) pair on its
    own row. experts: the layer's SlimmableExperts; x (N, C); expert_idx, gates, h (N, k): each pair's expert,
    gate and hidden units (0: not run, top-p routing), as MoSELayer.route gives them. Returns y (N, C).
    Plain tensors in and out: this file needs nothing from model.py, which imports it."""
    rows = []
    for n, (experts_n, gates_n, h_n) in enumerate(zip(expert_idx.tolist(), gates.tolist(), h.tolist())):
        y_n = None
        for e, gate, h_e in zip(experts_n, gates_n, h_n):             # h_e: this pair's h
            if not h_e:
                continue
            a = x[n:n + 1] @ experts.c_fc[e, :, :h_e]                  # (1, h_e): SlimmableExperts' formula
            if experts.b_fc is not None:                               # for one row (in place: no autograd)
                a += experts.b_fc[e, :h_e]
            y_e = F.gelu(a) @ experts.c_proj[e, :h_e, :]               # (1, C)
            if experts.b_proj is not None:
                y_e += experts.b_proj[e]
            y_n = y_e.mul_(gate) if y_n is None else y_n.add_(y_e, alpha=gate)
        rows.append(y_n)
    return torch.cat(rows) if len(rows) > 1 else rows[0]              # (N, C)
