"""
Sample from a trained model at a chosen compute:

    python sample.py --out_dir=out-shakespeare-mose                               # full width
    python sample.py --out_dir=out-shakespeare-mose --width=0.5 --k_exp=1         # the two dials by hand
    python sample.py --out_dir=out-shakespeare-mose --width=0.5,1.0 --k_exp=1,2   # one per MoE layer
    python sample.py --out_dir=out-shakespeare-mose --policy=confidence --gamma=2 --width=0.5   # Gamma = 0.5
    python sample.py --out_dir=out-shakespeare-mose --policy=ttt --budget=0.5     # half the expert FLOPs
    python sample.py --out_dir=out-shakespeare-mose --route_top_p=0.6             # 1 or 2 experts per token
    python sample.py --out_dir=out-shakespeare-mose --width=0.5 --route_top_p=0.5 # both: ~30 % of expert FLOPs
    python sample.py --out_dir=out-shakespeare-mose --policy=width_top_p --budget=0.3   # both, fitted
    python sample.py --out_dir=out-shakespeare-mose --policy=confidence --budget=0.5 --show_widths
    python sample.py --out_dir=out-shakespeare-mose --policy=confidence --budget=0.5 --html=widths.html

--budget is a fraction of the full-width expert FLOPs at the k_exp used; the script picks the settings that
meet it: uniform takes width = budget, confidence fits Gamma on calibration text (random windows of the
training split, a fixed seed), ttt first learns gamma there (test-time training) and then fits Gamma, search
tries gammas there with Gamma refitted to the budget at each, width_top_p searches a uniform width with the
top-p routing that meets the budget there (MoSE's best points, at about 30-45 % of the expert FLOPs).
Without --budget, --width is the uniform width, or under the confidence policy its Gamma: the mean-width target
that the router's gates share out (ConfidenceWidth in model.py), not a width any expert runs at. bench_flops.py
takes the same dial flags (dials.check_dial_flags checks them for both) for one more operating point. After each
sample it prints the FLOPs per token the model actually spent and the tokens per second.

Where the compute goes (show_widths.py): --show_widths prints the text (prompt included) with each token
coloured by the width its experts ran at, the mean over the (token, expert) pairs that ran (top-p routing's
skipped pairs, width 0, do not count) averaged over the MoE layers (--width_layer=N: MoE layer N alone), on a
scale from narrow (blue) to wide (red), with a legend. On a terminal it uses ANSI colours (24-bit where
COLORTERM=truecolor, else 256); piped, or with NO_COLOR set, it prints plain text instead, each token followed by
its width as ⟨0.62⟩ (⟨-⟩: no width), the prompt inside ⟦ ⟧, a newline shown as ↵. The last token has no width:
it is sampled but never read. --html=FILE writes the same as a self-contained page (no scripts, no external
files): each token's tooltip gives its width in each MoE layer, its experts and their gates. Only then does
generate keep a trace of each step's widths.
"""

import contextlib
import os
import sys
import time

import torch

from configurator import configure, fail, setup_device
from checkpoint import check_tokenizer, load_checkpoint
from dials import calibration_batches, check_dial_flags, check_route_top_p, make_policy
from prepare_data import gpt2_encoding

# -----------------------------------------------------------------------------
out_dir = "out"
start = "\n"              # the prompt, or "FILE:prompt.txt" to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8         # < 1 sharpens, > 1 flattens the next-token distribution
top_k = 200               # sample among the top_k most likely tokens (0 = all); not the expert count k_exp
seed = 1337
device = "auto"           # cuda, then mps, then cpu
dtype = "auto"            # bfloat16 on cuda where supported, else float16; float32 elsewhere
compile = False
use_cache = True          # KV cache: keys/values of earlier positions are kept between steps
# the compute dials
width = (1.0,)            # uniform: the width, or one per MoE layer (--width=0.5,1.0); confidence policy:
                          # Gamma, the mean-width target its gates share out (not a width); without --budget
k_exp = (0,)              # experts per token, or one per MoE layer (--k_exp=1,2); 0 = the checkpoint's training value
policy = "uniform"        # uniform | confidence | ttt | search (gamma searched) | allocate (a width per MoE layer)
                          # | width_top_p (a width and route_top_p, fitted together)
gamma = 1.0               # confidence policy: sharpness of the router probabilities
budget = 0.0              # 0 = none; else a fraction in (0, 1] of the full-width expert FLOPs
route_top_p = 0.0         # > 0: top-p routing (Matryoshka MoE), each token takes experts by probability until
                          # their mass reaches route_top_p, at most k_exp; 0 = always k_exp
w_min = 0.25              # confidence / ttt: the narrowest width an expert may get
ttt_batches = 50          # calibration text for budgets: the paper's 50 batches of 6 sequences, SGD lr 0.01
ttt_batch_size = 6
ttt_lr = 0.01
data_dir = ""             # where the calibration text lives; '' = the checkpoint's data_dir and dataset
dataset = ""
# where the compute goes (show_widths.py)
show_widths = False       # the text coloured by each token's expert width (plain ⟨width⟩ markers when piped/NO_COLOR)
html = ""                 # also write it as a self-contained HTML page to this file
width_layer = -1          # -1 = each token's width averaged over the MoE layers; N = MoE layer N's alone
color_by = "mean"         # a token's width: 'mean' of its experts' widths, or 'top': its most probable expert's
                          # (the confidence policy keeps a token's mean near Gamma; the top expert's shows the router)
config = configure(globals())
# -----------------------------------------------------------------------------

# check every dial before any work, so a typo costs nothing (bench_flops.py checks its dial flags alike)
try:
    width = check_dial_flags(width, k_exp, policy, budget, gamma, w_min)   # a float, or one per MoE layer
    if route_top_p:   # 0 = off
        check_route_top_p(route_top_p)
    if policy == "width_top_p" and route_top_p:
        raise ValueError("policy 'width_top_p' fits route_top_p to the budget itself: drop --route_top_p")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or max_new_tokens < 1 or num_samples < 0:
        raise ValueError("need top_k >= 0, max_new_tokens >= 1 and num_samples >= 0")
    if color_by not in ("mean", "top"):
        raise ValueError(f"color_by must be mean or top, got '{color_by}'")
    if width_layer < -1:
        raise ValueError(f"width_layer is a MoE layer's index (-1 = the mean over the MoE layers), got {width_layer}")
    if html and not os.path.isdir(os.path.dirname(os.path.abspath(html))):
        raise ValueError(f"cannot write --html={html}: no folder {os.path.dirname(os.path.abspath(html))}")
    if budget and policy != "uniform" and (ttt_batches < 1 or ttt_batch_size < 1 or not ttt_lr > 0):
        raise ValueError("fitting a budget needs ttt_batches >= 1, ttt_batch_size >= 1 and ttt_lr > 0")
except ValueError as e:
    fail(str(e))

device, device_type, dtype, ctx = setup_device(device, dtype)
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

try:
    model, checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
model.eval()
cfg = model.config
if cfg.n_exp == 0:
    if width != 1.0 or any(k_exp) or policy != "uniform" or budget or route_top_p:
        fail("this checkpoint is a dense GPT (n_exp=0): it has no width, k_exp, route_top_p, policy or budget dial")
    k = None
    if show_widths or html:
        fail("this checkpoint is a dense GPT (n_exp=0): it has no expert widths to show (--show_widths, --html)")
else:
    if width_layer >= cfg.n_moe_layers:
        fail(f"--width_layer={width_layer} but the model has {cfg.n_moe_layers} MoE layers (0 to "
             f"{cfg.n_moe_layers - 1}; -1 = their mean)")
    for name, values in (("width", width), ("k_exp", k_exp)):
        n = len(values) if isinstance(values, (list, tuple)) else 1
        if n > 1 and n != cfg.n_moe_layers:
            fail(f"--{name} has {n} values but the model has {cfg.n_moe_layers} MoE layers: give one value, or one "
                 f"per MoE layer")
    k = [kk or cfg.k_exp for kk in k_exp]   # 0 = the training value
    k = k[0] if len(k) == 1 else k
    try:
        model.resolve_dials(None, k)   # the model's own range check for k_exp
    except ValueError as e:
        fail(f"{e} (0 = the training value {cfg.k_exp})")

# the tokenizer travels in the checkpoint
meta = checkpoint.get("meta") or {"tokenizer": "gpt2"}
if meta["tokenizer"] == "char":
    stoi, itos = meta["stoi"], meta["itos"]

    unk = meta.get("unk")   # the replacement symbol that rare characters were read as (gutenberg_char has one)

    def encode(s):
        unknown = sorted({c for c in s if c not in stoi})
        if unknown and unk is None:
            fail(f"the prompt has characters outside this model's vocabulary: {', '.join(map(repr, unknown))} "
                 f"(the model knows {len(stoi)} characters)")
        if unknown:
            print(f"the prompt's {', '.join(map(repr, unknown))} are outside this model's vocabulary: read as {unk!r}, "
                  f"as in training", file=sys.stderr)
        return [stoi[c] if c in stoi else stoi[unk] for c in s]

    def decode(ids):
        return "".join(itos[i] for i in ids)

    def pieces(ids):   # each token's own text (show_widths.py colours them one by one)
        return [itos[i] for i in ids]
else:
    enc = gpt2_encoding(fail)   # offline, tiktoken needs its cached files (TIKTOKEN_CACHE_DIR)
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = enc.decode

    def pieces(ids):   # a character split between tokens goes to the token it starts in
        text, offsets = enc.decode_with_offsets(ids)
        return [text[a:b] for a, b in zip(offsets, offsets[1:] + [len(text)])]
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {start[5:]}: {getattr(e, 'strerror', None) or e}")
start_ids = encode(start)
if not start_ids:
    fail("the prompt is empty: give at least one token with --start")


def calibration_text():
    """The text a budget is fitted on: random windows of the training split with a fixed seed (the same
    helper as bench_flops.py's). The budget is met on this text, not on the model's own samples."""
    saved = checkpoint.get("config", {})
    split_dir = os.path.join(data_dir or saved.get("data_dir", "data"), dataset or saved.get("dataset", ""))
    try:
        check_tokenizer(meta, split_dir)
        return calibration_batches(split_dir, cfg.block_size, ttt_batches, ttt_batch_size, seed, device,
                                   cfg.vocab_size, saved.get("holdout_tokens", 0))
    except ValueError as e:
        fail(str(e))


# the operating point: a width or a policy for forward(); fitting needs gradients (ttt), so no no_grad here
dial, how = None, ""
if cfg.n_exp:
    fits = bool(budget) and policy != "uniform"
    t0 = time.time()
    try:
        with ctx:
            dial = width if isinstance(width, list) else \
                make_policy(model, policy, width, budget or None, gamma, k,
                            calibration_text() if fits else None, w_min, ttt_lr=ttt_lr)
            if policy == "width_top_p":     # both dials: the width goes to generate's width, p to route_top_p
                dial, route_top_p = dial[0], dial[1] or 0.0
    except ValueError as e:
        fail(str(e))
    model.eval()
    if fits:
        how = (f", fitted to budget {budget:g} on {ttt_batches} x {ttt_batch_size} training windows "
               f"in {time.time() - t0:.1f}s")
    elif budget:
        how = f", width = budget {budget:g}"
full_flops = model.flops_breakdown(1.0)    # the reference: every expert at full width, training k_exp
full_flops_k = model.flops_breakdown(1.0, k)  # the expert budget's reference: full width at the k_exp used
at_k = "" if k in (None, cfg.k_exp) else f" at k_exp={cfg.k_exp}"
if cfg.n_exp:
    kind = "width " if isinstance(dial, float) else "widths per MoE layer " if isinstance(dial, list) else ""
    routing = f", top-p routing {route_top_p:g} (at most k_exp experts)" if route_top_p else ""
    point = f"policy {policy}, {kind}{dial!r}, k_exp {k}{routing}{how}"
    ref = f"full width{at_k}: {full_flops['total'] / 1e6:.3f} MFLOPs/token ({full_flops['experts'] / 1e6:.3f} in " \
        f"the experts" + (f"; {full_flops_k['experts'] / 1e6:.3f} at k_exp={k}" if at_k else "") + ")"
else:
    point, ref = "dense GPT (no dials)", f"{full_flops['total'] / 1e6:.3f} MFLOPs/token"
print(f"operating point: {point}; {ref}")
if compile:
    model.compile()   # compiles forward in place: generate() calls it through self(...)

show = None
if show_widths or html:      # only then does generate keep a trace (show_widths.py)
    import show_widths as show
    color, truecolor = show.terminal_colours(sys.stdout)
    layer = None if width_layer < 0 else width_layer
    shown = []

x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        with show.recording(model) if show else contextlib.nullcontext() as rec:
            y, spent = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, width=dial,
                                      k_exp=k, use_cache=use_cache, route_top_p=route_top_p or None,
                                      trace=rec.trace if show else None)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        if show:
            shown.append(dict(pieces=pieces(y[0].tolist()), pairs=rec.pairs(y.size(1)), n_prompt=len(start_ids)))
        if show_widths:
            print(show.terminal(shown[-1]["pieces"], shown[-1]["pairs"], len(start_ids), layer, color, truecolor,
                                color_by))
            print(show.legend([shown[-1]["pairs"]], cfg.n_moe_layers, layer, color, truecolor, point,
                              bool(route_top_p), color_by))
        else:
            print(decode(y[0].tolist()))
        # generate's stats add the (constant) non-expert FLOPs to what the experts spent, so subtract them back
        if cfg.n_exp:
            experts = f"; experts {100 * (spent - full_flops_k['non_expert']) / full_flops_k['experts']:.1f} %" + \
                (f" at k_exp={k}" if at_k else "")
        else:
            experts = "; dense"
        spent_line = (f"spent {spent / 1e6:.3f} MFLOPs/token ({100 * spent / full_flops['total']:.1f} % of full width"
                      f"{at_k}{experts})")
        print(f"{spent_line}, {max_new_tokens / dt:.1f} tokens/s")
        print("---------------")
        if show:
            shown[-1]["spent"] = spent_line
if html:
    try:
        with open(html, "w", encoding="utf-8") as f:
            f.write(show.page(shown, cfg.n_moe_layers, layer, point, ref, bool(route_top_p), color_by))
    except OSError as e:
        fail(f"cannot write --html={html}: {e.strerror}")
    print(f"wrote {html}: open it in a browser; hover over a token for its experts and widths")
