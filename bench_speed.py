"""
Does the clock follow the FLOPs? Times the compute dial side by side and prints time ratios next to FLOPs
ratios (medians of `repeats`, with the spread), all on random weights (speed does not depend on training):

  layer     one MoSELayer at the OpenWebText-small sizes, forward and forward+backward, uniform widths, the
            confidence policy with Gamma fitted to each budget and the training law (random_pair); with
            fast_decode.py's path and without
  model     the whole OpenWebText-small model's forward, time ratio vs flops_breakdown's ratio
  train     MoSE training steps against a plain MoE step (full width): the shipped single pass with a random
            width per (token, expert) pair (width_sampling='random_pair'), the paper's two passes (full width +
            one narrower width, as 'max_random'), and a uniform-width step; with the page faults each step took
            (--heap=glibc: glibc's own heap policy instead of train.py's)
  decode    tokens/s of generate() with the KV cache, batch 1, at width 1 and 0.5, Shakespeare and OWT-small;
            where the text outgrows block_size, also decoding that drops the KV cache there and recomputes the
            last block_size tokens at every step (what generate's sliding window saves)
  fast      what fast_decode.py saves end to end: decoding (both models), and the training step as a check that
            it takes no fast path, each with fast_decode.py's path (GPT.set_fast(True), the default) and without
  nanomoe   (not in the default parts: it needs a nanoMoE checkout, whose code is never copied here) a training
            step of nanoMoE (github.com/wolfecameron/nanoMoE) and of this model at full width, side by side in
            one process, at nanoMoE-sized dims (4 layers, n_embd 128, 4 experts, top-2, MoE in every block), at
            768, 2,048 and 8,192 tokens per step: ms/step, the speed-up, and time per token (is cost linear?)

Operating points run round-robin (every point once per repeat) so a load that comes and goes hits all alike.
On a shared machine use --clock=cpu (this process's CPU time; with one thread that is the work done).

    python bench_speed.py                                  # everything but nanomoe, prints tables
    python bench_speed.py --parts=layer --json=speed.json   # one part, rows to a JSON file
    python bench_speed.py --parts=nanomoe --nanomoe=/path/to/nanoMoE   # against nanoMoE (git clone it anywhere)
"""

import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time

import torch

from configurator import check_ranges, configure, fail, heap_trimmer, setup_device
from model import GPT, ConfidenceWidth, GPTConfig, MoSELayer
from recipes import RandomWidth

SHIPPED = dict(width_mix=(0.25, 0.25, 0.25, 0.25), p_sequence=0.5)   # random_pair's law: train.py's defaults

# -----------------------------------------------------------------------------
parts = ("layer", "model", "train", "decode", "fast")
repeats = 5
clock = "wall"                  # 'wall' (perf_counter) or 'cpu' (process_time: robust to other processes)
# the OpenWebText-small sizes (config/train_owt_mose_small.py); give others as flags, e.g. the Gutenberg shape
n_layer, n_head, n_embd, n_exp, k_exp, moe_stride = 6, 6, 384, 8, 2, 2
expert_hidden, width_multiple, vocab_size, block_size = 1536, 16, 50304, 1024
layer_tokens = 4096             # tokens through one MoSELayer
model_batch, model_seq = 2, 1024    # whole-model forward
train_batch, train_seq = 1, 1024    # training step
uniform_widths = (1.0, 0.75, 0.5, 0.3, 0.25)
gammas = (1.0, 4.0)             # confidence policy, Gamma fitted to each budget
budgets = (0.75, 0.5, 0.3)      # fractions of full-width expert FLOPs
mose_width = 0.5                # the narrower width of the MoSE training step
router_std = 1.0                # router logits' std on unit inputs: random weights at 0.02 give near-uniform
                                # gates, so the confidence policy would hand every expert the same width
decode_tokens = 500             # sample.py's max_new_tokens: past the Shakespeare model's block_size (128)
# the nanomoe part: nanoMoE's MoE at a size where it runs in seconds on a CPU. Expert hidden is 4 * n_embd (fixed
# in nanoMoE); character vocabulary and 256-token blocks as for Shakespeare. A step of T tokens is T // seq
# sequences of seq tokens (T <= seq: one sequence of T)
nanomoe = ""                    # path to a nanoMoE checkout (the folder holding its model.py and manager.py)
nanomoe_tokens = (768, 2048, 8192)
nanomoe_layer, nanomoe_head, nanomoe_embd, nanomoe_exp, nanomoe_k = 4, 4, 128, 4, 2
nanomoe_vocab, nanomoe_seq = 65, 256
warmup = True                   # one untimed run of every point first; False where one run takes a minute
                                # (nanoMoE at 8,192 tokens) and its start-up costs are lost in that minute
json_path = ""                  # --json=rows.json
heap = "train"                  # 'train': the C heap as train.py runs it (configurator.heap_trimmer); 'glibc': glibc's
                                # own policy, under which the train part's steps page-fault back what the step before
                                # freed, more or fewer by what ran before them (RESULTS.md, "the page faults").
                                # Process-wide (mallopt): every part runs under it; only the train part's steps trim
device = "cpu"
dtype = "float32"
seed = 1337
given = set()                   # the keys given on the command line (filled by configure)
# -----------------------------------------------------------------------------
config = configure(globals(), aliases={"json": "json_path"}, given=given)
check_ranges(config, {   # every number in its range before any work
    **{k: (lambda v: v >= 1, ">= 1") for k in ("repeats", "n_layer", "n_head", "n_embd", "n_exp", "k_exp",
                                             "moe_stride", "expert_hidden", "width_multiple", "vocab_size",
                                             "block_size", "layer_tokens", "model_batch", "model_seq", "train_batch",
                                             "train_seq", "decode_tokens", "nanomoe_tokens")},
    **{k: (lambda v: 0 < v <= 1, "in (0, 1]") for k in ("uniform_widths", "budgets", "mose_width")},
    "gammas": (lambda v: v >= 0, ">= 0"), "router_std": (lambda v: v > 0, "> 0"),
})
parts = tuple(p for s in parts for p in s.split(","))   # --parts=layer,model arrives as one string
SIZES = ("n_layer", "n_head", "n_embd", "n_exp", "k_exp", "moe_stride", "expert_hidden", "width_multiple", "vocab_size",
         "block_size")   # the model's: owt_config builds it from them; given as flags, the tables name them
dims = "OpenWebText-small" if not given & set(SIZES) else \
    f"{n_layer} layers, n_embd {n_embd}, {n_exp} experts of {expert_hidden}, an MoE layer every {moe_stride}"
if clock not in ("wall", "cpu"):
    fail(f"clock must be 'wall' or 'cpu', got '{clock}'")
if heap not in ("train", "glibc"):
    fail(f"heap must be 'train' (as train.py runs it) or 'glibc' (glibc's own policy), got '{heap}'")
unknown = set(parts) - {"layer", "model", "train", "decode", "fast", "nanomoe"}
if unknown:
    fail(f"parts must be among layer, model, train, decode, fast, nanomoe; got {', '.join(sorted(unknown))}")
if max(model_seq, train_seq) > block_size:
    fail(f"model_seq and train_seq must be at most block_size ({block_size}); got {model_seq}, {train_seq}")
if "nanomoe" in parts:   # checked and imported before any part runs, so a bad path fails at once
    if not nanomoe:
        fail("the nanomoe part runs a nanoMoE checkout side by side: give its folder with "
             "--nanomoe=/path/to/nanoMoE (git clone https://github.com/wolfecameron/nanoMoE)")
    nanomoe_file = os.path.join(nanomoe, "model.py")
    if not os.path.isfile(nanomoe_file):
        fail(f"no model.py in --nanomoe={nanomoe}: give the folder of a nanoMoE checkout "
             f"(git clone https://github.com/wolfecameron/nanoMoE)")
    bad = [t for t in nanomoe_tokens if t < 1 or (t > nanomoe_seq and t % nanomoe_seq)]
    if bad:
        fail(f"nanomoe_tokens must be at most nanomoe_seq ({nanomoe_seq}) or a multiple of it; got {bad}")
    # its model.py is a module called 'model' too, so it is loaded under another name; it does `from manager
    # import MANAGER` (the manager.py beside it), so its folder is on the path while it loads
    sys.path.insert(0, os.path.abspath(nanomoe))
    try:
        spec = importlib.util.spec_from_file_location("nanomoe_model", nanomoe_file)
        nanomoe_model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nanomoe_model)
    except Exception as e:   # its code, not ours: the reason in one line is the fix, a traceback is not
        fail(f"cannot import {nanomoe_file}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]} "
             f"(is --nanomoe a nanoMoE checkout?)")
    finally:
        sys.path.remove(os.path.abspath(nanomoe))
    if not all(hasattr(nanomoe_model, n) for n in ("GPT", "GPTConfig")):
        fail(f"{nanomoe_file} defines no GPT and GPTConfig: is --nanomoe a nanoMoE checkout?")
device, device_type, ptdtype, ctx = setup_device(device, dtype)
torch.manual_seed(seed)
trim_heap = heap_trimmer() if heap == "train" else (lambda: None)   # the C heap as train.py runs it
now = time.perf_counter if clock == "wall" else time.process_time
sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
rows = []
print(f"torch {torch.__version__}, {device}, {dtype}, {torch.get_num_threads()} threads, clock={clock}, "
      f"medians of {repeats}")


def owt_config(**kw):
    return GPTConfig(**{**{k: config[k] for k in SIZES}, **kw})   # the sizes above, as given, and kw's changes


def sharpen_routers(module):
    for m in module.modules():
        if hasattr(m, "w_g"):
            torch.nn.init.normal_(m.w_g.weight, std=router_std / m.w_g.weight.size(1) ** 0.5)


def round_robin(points, fn):
    """fn(point) -> seconds of one run; every point once per repeat after a warm-up (unless --warmup=False).
    {name: [seconds]}."""
    times = {name: [] for name in points}
    for name, p in points.items() if warmup else ():
        fn(p)
    for _ in range(repeats):
        for name, p in points.items():
            times[name].append(fn(p))
    return times


def minor_faults():
    """This process's minor page faults so far (0 where the resource module or its count is missing)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, AttributeError):
        return 0


def timed(f):
    sync()
    t0 = now()
    f()
    sync()
    return now() - t0


def ratio_stats(times, base):
    """Median time ratio to `base` over the repeats (each repeat's own ratio), and the spread (min..max)."""
    r = [t / b for t, b in zip(times, base)]
    return statistics.median(r), min(r), max(r)


def report(part, times, base, flops, extra=None):
    """Print one table: per point, median time, time ratio (spread) and FLOPs ratio; add the rows."""
    print(f"\n{part}\n{'point':<34} {'median ms':>10} {'time ratio':>11} {'spread':>13} {'FLOPs ratio':>12}")
    for name, ts in times.items():
        med, lo, hi = ratio_stats(ts, times[base])
        print(f"{name:<34} {statistics.median(ts) * 1e3:10.1f} {med:11.3f} {lo:6.3f}..{hi:6.3f} {flops[name]:12.3f}")
        rows.append(dict(part=part, point=name, median_s=statistics.median(ts), time_ratio=med, spread=[lo, hi],
                         flops_ratio=flops[name], times_s=ts, **(extra or {})))


def fit_gamma_on_layer(layer, x, gamma, budget):
    """Gamma whose spent expert FLOPs on x are `budget` of full width (bisection in log space, as fit_budget)."""
    with torch.no_grad():
        gates = layer.router(x, k_exp).gates
    frac = lambda G: (layer.experts.hidden_units(ConfidenceWidth(gamma, G)(gates, 0)).float().mean()
                      / expert_hidden).item()
    lo, hi = 1e-3, 64.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if frac(mid) < budget else (lo, mid)
    return ConfidenceWidth(gamma, hi), frac(hi)


# --- one MoE layer ---------------------------------------------------------------------------------------
if "layer" in parts:
    layer = MoSELayer(owt_config(), 0).to(device)
    for p in layer.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    sharpen_routers(layer)
    x = torch.randn(1, layer_tokens, n_embd, device=device)
    points, flops = {}, {}
    for w in uniform_widths:
        points[f"uniform {w:g}"], flops[f"uniform {w:g}"] = w, layer.experts.hidden_units(w) / expert_hidden
    for g in gammas:
        for b in budgets:
            policy, spent = fit_gamma_on_layer(layer, x[0], g, b)
            name = f"confidence gamma={g:g} budget={b:g}"
            points[name], flops[name] = policy, spent
    # the shipped training law (train.py's defaults): every pair its own width, each width's rows their own grouped
    # matmuls; beside a uniform width of the same FLOPs (--uniform_widths="(1.0,0.625)") it shows what that costs
    seq = train_seq if layer_tokens % train_seq == 0 else layer_tokens   # p_sequence needs whole sequences
    pair = points["random_pair"] = RandomWidth(**SHIPPED, seq_len=seq, generator=torch.Generator().manual_seed(seed))
    # every pair's width has the law, so its expectation; a single pass's own FLOPs vary where its one-width sequences
    # are too few to split in exact shares (4 sequences of 1,024: 2 at one width)
    flops["random_pair"] = sum(p * layer.experts.hidden_units(w) for w, p in pair.mix().items()) / expert_hidden
    base = f"uniform {uniform_widths[0]:g}"
    for plain in (False, True):
        layer.use_fast = not plain                  # fast_decode.py's path, or model.py's plain code alone
        for backward in (False, True):
            def run(w):
                if not backward:
                    with torch.no_grad(), ctx:
                        return timed(lambda: layer(x, w, k_exp))
                xx = x.clone().requires_grad_()
                def step():
                    with ctx:
                        y = layer(xx, w, k_exp)[0]
                    y.float().square().mean().backward()
                return timed(step)
            name = f"layer {'forward+backward' if backward else 'forward'} ({'plain' if plain else 'fast'})"
            report(name, round_robin(points, run), base, flops,
                   dict(tokens=layer_tokens, path="plain" if plain else "fast", backward=backward))
    del layer, x

# --- the whole model's forward --------------------------------------------------------------------------
if "model" in parts or "train" in parts:
    model = GPT(owt_config()).to(device)
    sharpen_routers(model)
    calib = [torch.randint(0, vocab_size, (1, min(256, block_size)), device=device)]   # to fit Gamma on

    def fit_model_gamma(gamma, budget):
        from dials import fit_budget
        model.eval()
        return fit_budget(model, ConfidenceWidth(gamma, budget), calib, budget)

if "model" in parts:
    model.eval()
    idx = torch.randint(0, vocab_size, (model_batch, model_seq), device=device)
    points = {f"uniform {w:g}": w for w in uniform_widths}
    for b in budgets:
        points[f"confidence gamma={gammas[0]:g} budget={b:g}"] = fit_model_gamma(gammas[0], b)
    full = model.flops_breakdown(1.0, seq_len=model_seq)["total"]
    flops = {}
    with torch.no_grad(), ctx:
        for name, w in points.items():   # a policy's FLOPs: what its forward spent on this batch
            out = model(idx, idx, width=w)
            non_expert = model.flops_breakdown(1.0, seq_len=model_seq)["non_expert"]
            flops[name] = (non_expert + out.stats["expert_flops"].item()) / full

    def run(w):
        with torch.no_grad(), ctx:
            return timed(lambda: model(idx, idx, width=w))
    report(f"model forward ({dims}, random weights)", round_robin(points, run), "uniform 1", flops,
           dict(tokens=model_batch * model_seq))

# --- a training step -------------------------------------------------------------------------------------
if "train" in parts:
    model.train()
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    idx = torch.randint(0, vocab_size, (train_batch, train_seq), device=device)
    F = lambda w: model.flops_breakdown(w, seq_len=train_seq)["total"]
    # the shipped recipe (train.py's defaults): one pass, a random width per (token, expert) pair, half the sequences
    # one width throughout
    random_pair = RandomWidth(**SHIPPED, seq_len=train_seq, generator=torch.Generator().manual_seed(seed))
    points = {"plain MoE step (width 1)": (1.0,), f"uniform {mose_width:g} step": (mose_width,),
              f"MoSE step (width 1 + {mose_width:g})": (1.0, mose_width), "MoSE step (random_pair)": (random_pair,)}
    flops = {name: sum(F(w) for w in ws) / F(1.0) for name, ws in points.items() if random_pair not in ws}
    # random_pair's FLOPs: the law's expectation (FLOPs are linear in h), as in the layer part; with few sequences
    # a step's own draw runs more or less (--train_batch=1: the one sequence is one width, or mixed pairs)
    flops["MoSE step (random_pair)"] = sum(p * F(w) for w, p in random_pair.mix().items()) / F(1.0)

    def run(point):
        name, ws = point
        def step():
            for w in ws:   # losses summed over the widths: one backward each, gradients accumulate
                with ctx:
                    out = model(idx, idx, width=w)
                (out.loss + out.router_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            trim_heap()
        before = minor_faults()
        seconds = timed(step)
        faults[name].append(minor_faults() - before)
        return seconds
    faults = {name: [] for name in points}   # the minor page faults of every timed step (0 where getrusage is missing)
    part = f"training step ({dims}, AdamW, heap={heap})"
    report(part, round_robin({name: (name, ws) for name, ws in points.items()}, run), "plain MoE step (width 1)",
           flops, dict(tokens=train_batch * train_seq, heap=heap))
    for row in rows:
        if row["part"] == part:
            row["page_faults"] = faults[row["point"]][-repeats:]
    print("page faults a step (median): " + ", ".join(f"{name} {statistics.median(f[-repeats:]):,.0f}"
                                                      for name, f in faults.items()))

if "model" in parts or "train" in parts:
    del model

# --- decoding --------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_recomputing(model, idx, n, width):
    """Decoding without generate's sliding window, to time generate against: the KV cache until the text fills
    block_size, then no cache, the last block_size tokens recomputed at every step. Greedy (argmax: a few
    calls fewer than generate's top_k=1 sampling, so if anything this side is flattered)."""
    cache, block = model.new_kv_cache(), model.config.block_size
    for _ in range(n):
        if idx.size(1) > block:
            logits = model(idx[:, -block:], width=width).logits                    # the whole window, no cache
        else:
            logits = model(idx[:, -1:] if cache[0] else idx, width=width, kv_cache=cache).logits
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


if "decode" in parts:
    print(f"\ndecoding: generate() with the KV cache, batch 1, {decode_tokens} new tokens; 'recomputed': the window "
          f"recomputed every step past block_size, without generate's sliding window")
    print(f"{'model':<28} {'point':>18} {'tokens/s':>10} {'spread':>17} {'vs width 1':>11} {'spread':>13} "
          f"{'FLOPs ratio':>12}")
    models = {"shakespeare (0.8M)": GPTConfig(block_size=128, vocab_size=65, n_layer=4, n_head=4, n_embd=128,
                                              n_exp=8, k_exp=2, expert_hidden=256),
              "openwebtext-small": owt_config()}
    for mname, cfg in models.items():
        model = GPT(cfg).to(device).eval()
        sharpen_routers(model)
        prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
        points = {"width 1": (model.generate, 1.0), "width 0.5": (model.generate, 0.5)}
        if 1 + decode_tokens > cfg.block_size:   # the text outgrows the window: time the old way too
            points["width 1 recomputed"] = (generate_recomputing, 1.0)

        def run(p):
            fn, w = p
            with ctx:
                if fn is generate_recomputing:
                    return timed(lambda: generate_recomputing(model, prompt, decode_tokens, w))
                return timed(lambda: model.generate(prompt, decode_tokens, width=w, top_k=1))
        times = round_robin(points, run)
        seq = min(decode_tokens, cfg.block_size)
        for name, ts in times.items():
            w = points[name][1]
            tps = [decode_tokens / t for t in ts]
            # each repeat's own speed-up (time at width 1 / time at this point, the two run back to back): a
            # point decodes measurably faster when even the smallest of them is above 1
            med, lo, hi = ratio_stats(times["width 1"], ts)
            flops = model.flops_per_token(w, seq_len=seq) / model.flops_per_token(1.0, seq_len=seq)
            print(f"{mname:<28} {name:>18} {statistics.median(tps):10.1f} {min(tps):8.1f}..{max(tps):7.1f} "
                  f"{med:11.3f} {lo:6.3f}..{hi:5.3f} {flops:12.3f}")
            rows.append(dict(part="decode", point=f"{mname} {name}", tokens_per_s=statistics.median(tps),
                             spread=[min(tps), max(tps)], speedup_vs_width_1=med, speedup_spread=[lo, hi],
                             flops_ratio=flops, times_s=ts))
        del model

# --- what fast_decode.py saves --------------------------------------------------------------------------
if "fast" in parts:
    print("\nfast_decode.py: time without its path / time with it (> 1: it saves that much), same points side by side")
    print(f"{'point':<52} {'fast ms':>9} {'plain ms':>9} {'speed-up':>9} {'spread':>13}")
    shakespeare = GPTConfig(block_size=128, vocab_size=65, n_layer=4, n_head=4, n_embd=128, n_exp=8, k_exp=2,
                            expert_hidden=256)
    for mname, cfg in (("OWT-small", owt_config()), ("shakespeare", shakespeare)):
        model = GPT(cfg).to(device)
        sharpen_routers(model)
        opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
        seq = min(train_seq, cfg.block_size)
        idx = torch.randint(0, cfg.vocab_size, (train_batch * (train_seq // seq), seq), device=device)
        prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
        pair = RandomWidth(**SHIPPED, seq_len=seq, generator=torch.Generator().manual_seed(seed))

        def train_step(w):
            model.train()
            with ctx:
                out = model(idx, idx, width=w)
            (out.loss + out.router_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def decode(w):
            model.eval()
            with ctx:
                model.generate(prompt, decode_tokens, width=w, top_k=1)
        points = {}
        for what, fn, w in ((f"training step, plain MoE ({idx.numel()} tokens)", train_step, 1.0),
                            (f"training step, random_pair ({idx.numel()} tokens)", train_step, pair),
                            (f"decoding {decode_tokens} tokens, width 1", decode, 1.0),
                            (f"decoding {decode_tokens} tokens, confidence Gamma 0.5", decode,
                             ConfidenceWidth(1.0, 0.5))):
            for on in (True, False):
                points[(what, on)] = (fn, w, on)

        def run(p):
            fn, w, on = p
            model.set_fast(on)
            return timed(lambda: fn(w))
        times = round_robin(points, run)
        for what in dict.fromkeys(name for name, _ in points):
            fast_t, plain_t = times[(what, True)], times[(what, False)]
            med, lo, hi = ratio_stats(plain_t, fast_t)
            print(f"{mname + ', ' + what:<52} {statistics.median(fast_t) * 1e3:9.1f} "
                  f"{statistics.median(plain_t) * 1e3:9.1f} {med:9.3f} {lo:6.3f}..{hi:5.3f}")
            rows.append(dict(part="fast", point=f"{mname}, {what}", fast_median_s=statistics.median(fast_t),
                             plain_median_s=statistics.median(plain_t), speedup=med, spread=[lo, hi],
                             fast_times_s=fast_t, plain_times_s=plain_t))
        del model, opt

# --- against nanoMoE -------------------------------------------------------------------------------------
if "nanomoe" in parts:
    # Like for like: the same layers, heads, width, experts (4 * n_embd hidden), top-k and vocabulary, no
    # biases (nanoMoE's train.py default), no dropout, AdamW from each model's configure_optimizers with the same
    # settings, and the same losses: nanoMoE's load-balancing and z losses are off by default and switched on
    # here as its MoE config does (config/train_nano_moe.py: aux 0.01, z 0.001, router in fp32). Kept at
    # nanoMoE's defaults, because they are how it computes: a training capacity factor of 1.25 (each expert takes
    # at most floor(k * 1.25 * tokens / n_exp) tokens, at least min_capacity, the rest are dropped: they skip the
    # MoE layer) and the dispatch through dense one-hot (tokens, experts, capacity) tensors, whose size grows with
    # the square of the tokens in a step. Ours is dropless: every token runs its k experts.
    theirs_cfg = dict(n_layer=nanomoe_layer, n_head=nanomoe_head, n_embd=nanomoe_embd, vocab_size=nanomoe_vocab,
                      block_size=nanomoe_seq, dropout=0.0, bias=False, n_exp=nanomoe_exp, top_k=nanomoe_k, stride=1,
                      use_aux_loss=True, aux_loss_weight=0.01, use_router_z_loss=True, router_z_loss_weight=0.001,
                      router_use_full_prec=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # it prints its parameter counts; we print ours below
            theirs = nanomoe_model.GPT(nanomoe_model.GPTConfig(**theirs_cfg)).to(device)
            theirs_opt = theirs.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    except Exception as e:   # e.g. a nanoMoE whose config has other names (written against its 661fbcf)
        fail(f"cannot build nanoMoE's model from {nanomoe_file}: {type(e).__name__}: "
             f"{(str(e).splitlines() or [''])[0][:160]}")
    ours = GPT(GPTConfig(n_layer=nanomoe_layer, n_head=nanomoe_head, n_embd=nanomoe_embd, vocab_size=nanomoe_vocab,
                         block_size=nanomoe_seq, dropout=0.0, bias=False, n_exp=nanomoe_exp, k_exp=nanomoe_k,
                         moe_stride=1, expert_hidden=4 * nanomoe_embd)).to(device)
    ours_opt = ours.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    n_theirs, n_ours = (sum(p.numel() for p in m.parameters()) for m in (theirs, ours))   # tied weights once
    print(f"\nnanomoe: a training step (forward, loss + router losses, backward, AdamW) of nanoMoE and of nanoMoSE "
          f"at full width (a plain MoE step)\n  both: {nanomoe_layer} layers, {nanomoe_head} heads, n_embd "
          f"{nanomoe_embd}, {nanomoe_exp} experts of {4 * nanomoe_embd} hidden units, top-{nanomoe_k}, MoE in every "
          f"block, vocab {nanomoe_vocab}, no biases; parameters nanoMoE {n_theirs:,}, nanoMoSE {n_ours:,}\n"
          f"  nanoMoE's defaults kept: train capacity factor {getattr(theirs.config, 'train_capacity', '?')} (min "
          f"{getattr(theirs.config, 'min_capacity', '?')} per expert), tokens past an expert's capacity dropped; ours "
          f"is dropless")

    def dropped(idx):
        """Fraction of nanoMoE's (token, expert) assignments its capacity drops in a training-mode forward of idx,
        from what its routers return (used_capacity, per expert, first); None where they are not found."""
        kept = []
        hook = lambda m, args, out: kept.append(out[0].sum().item())
        hooks = [m.register_forward_hook(hook) for m in theirs.modules() if type(m).__name__ == "Router"]
        with torch.no_grad(), ctx:
            theirs(idx, idx)
        for h in hooks:
            h.remove()
        return 1 - sum(kept) / (len(kept) * nanomoe_k * idx.numel()) if kept else None

    def step(model, opt, idx):
        with ctx:
            out = model(idx, idx)
        # ours returns the LM loss and the router losses apart; nanoMoE's loss already holds its weighted
        # router losses
        loss = out.loss + out.router_loss if isinstance(model, GPT) else out[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches, drops, points = {}, {}, {}
    for t in nanomoe_tokens:
        seq = min(t, nanomoe_seq)
        batches[t] = torch.randint(0, nanomoe_vocab, (t // seq, seq), device=device)
        drops[t] = dropped(batches[t])
        points[(t, "nanoMoE")] = (theirs, theirs_opt, batches[t])
        points[(t, "nanoMoSE")] = (ours, ours_opt, batches[t])
    times = round_robin(points, lambda p: timed(lambda: step(*p)))
    print(f"{'tokens':>7} {'batch x seq':>11} {'nanoMoE ms':>11} {'nanoMoSE ms':>12} {'speed-up':>9} {'spread':>12} "
          f"{'nanoMoE us/tok':>15} {'nanoMoSE us/tok':>16} {'nanoMoE dropped':>16}")
    for t, idx in batches.items():
        th, us = times[(t, "nanoMoE")], times[(t, "nanoMoSE")]
        med, lo, hi = ratio_stats(th, us)   # nanoMoE's time / ours = our speed-up
        drop = "n/a" if drops[t] is None else f"{drops[t]:.1%}"
        print(f"{t:7d} {f'{idx.size(0)} x {idx.size(1)}':>11} {statistics.median(th) * 1e3:11.1f} "
              f"{statistics.median(us) * 1e3:12.1f} {med:9.2f} {lo:5.2f}..{hi:5.2f} "
              f"{statistics.median(th) / t * 1e6:15.1f} {statistics.median(us) / t * 1e6:16.1f} {drop:>16}")
        rows.append(dict(part="nanomoe", point=f"{t} tokens", tokens=t, batch=idx.size(0), seq=idx.size(1),
                         nanomoe_median_s=statistics.median(th), ours_median_s=statistics.median(us), speedup=med,
                         spread=[lo, hi], nanomoe_s_per_token=statistics.median(th) / t,
                         ours_s_per_token=statistics.median(us) / t, nanomoe_dropped=drops[t],
                         nanomoe_times_s=th, ours_times_s=us, nanomoe_params=n_theirs, ours_params=n_ours))
    if len(batches) > 1:   # linear cost: the time per token stays put as the step grows
        t0, t1 = min(batches), max(batches)
        per_tok = lambda who, t: statistics.median(times[(t, who)]) / t
        print(f"time per token at {t1:,} vs {t0:,} tokens (1.0 = cost linear in tokens): "
              f"nanoMoE {per_tok('nanoMoE', t1) / per_tok('nanoMoE', t0):.2f}x, "
              f"nanoMoSE {per_tok('nanoMoSE', t1) / per_tok('nanoMoSE', t0):.2f}x")
    del theirs, ours, theirs_opt, ours_opt

if json_path:
    with open(json_path, "w") as f:
        json.dump(dict(config=config, torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f,
                  indent=1)
    print(f"\nwrote {json_path}")
