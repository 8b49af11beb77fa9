"""
Sample from a trained model at a chosen compute:

    python sample.py --out_dir=out-shakespeare-mose                              # full width
    python sample.py --out_dir=out-shakespeare-mose --width=0.5 --k_exp=1        # the two dials by hand
    python sample.py --out_dir=out-shakespeare-mose --policy=ttt --budget=0.5    # half the expert FLOPs

With --budget (a fraction of the full-width expert FLOPs) the script picks the settings that meet it: uniform
takes width = budget; confidence fits Gamma to the budget on validation text; ttt first learns gamma there.
It prints, with each sample, the FLOPs per token the model actually spent and the tokens per second.
"""

import os
import time
from contextlib import nullcontext

import numpy as np
import torch

from configurator import configure, fail
from model import POLICIES, check_width, load_checkpoint, make_policy

# -----------------------------------------------------------------------------
out_dir = "out"
start = "\n"              # the prompt, or "FILE:prompt.txt" to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8         # < 1 sharpens, > 1 flattens the next-token distribution
top_k = 200               # sample among the top_k most likely tokens (0 = all); not the expert count, k_exp
seed = 1337
device = "auto"
dtype = "auto"
compile = False
use_cache = True          # KV cache: keys/values of earlier positions are kept between steps
# the compute dials
width = 1.0               # uniform width; the confidence policy's Gamma when there is no budget
k_exp = 0                 # experts per token; 0 = the training value
policy = "uniform"        # uniform | confidence | ttt
gamma = 1.0               # confidence policy: sharpness
budget = 0.0              # 0 = none; else a fraction in (0, 1] of the full-width expert FLOPs
w_min = 0.25
ttt_batches = 50          # the paper: 50 batches of 6 sequences, SGD, lr 0.01
ttt_batch_size = 6
ttt_lr = 0.01
data_dir = ""             # calibration text; '' = the checkpoint's data_dir and dataset
dataset = ""
config = configure(globals())
# -----------------------------------------------------------------------------

# check the dials before any work, so a typo costs nothing
try:
    check_width(width)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got '{policy}'")
    if budget and not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1] (a fraction of full-width expert FLOPs), got {budget}")
    if policy == "ttt" and not budget:
        raise ValueError("policy 'ttt' learns gamma for a FLOPs budget: pass --budget")
except ValueError as e:
    fail(str(e))
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
device_type = device.split(":")[0]
if dtype == "auto":
    dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.manual_seed(seed)

try:
    model, checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), device)
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
model.eval()
cfg = model.config
if cfg.n_exp == 0 and (width != 1.0 or k_exp or policy != "uniform" or budget):
    fail("this checkpoint is a dense GPT (n_exp=0): it has no width or k_exp dial")
if cfg.n_exp and not 0 <= k_exp <= cfg.n_exp:
    fail(f"k_exp must be in [1, n_exp={cfg.n_exp}] (0 = the training value {cfg.k_exp}), got {k_exp}")
k = (k_exp or cfg.k_exp) if cfg.n_exp else None

# the tokenizer travels in the checkpoint
meta = checkpoint["meta"]
if meta["tokenizer"] == "char":
    stoi, itos = meta["stoi"], meta["itos"]

    def encode(s):
        unknown = sorted({c for c in s if c not in stoi})
        if unknown:
            fail(f"the prompt has characters outside this model's vocabulary: {', '.join(map(repr, unknown))} "
                 f"(it knows {len(stoi)} characters)")
        return [stoi[c] for c in s]
    decode = lambda ids: "".join(itos[i] for i in ids)
else:
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = enc.decode
if start.startswith("FILE:"):
    try:
        start = open(start[5:], encoding="utf-8").read()
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]}: {e.strerror}")
start_ids = encode(start)
if not start_ids:
    fail("the prompt is empty: give at least one token with --start")


def calibration_batches():
    """Random windows of the validation split, the text the budget is fitted on."""
    path = os.path.join(data_dir or checkpoint["config"]["data_dir"], dataset or checkpoint["config"]["dataset"],
                        "val.bin")
    if not os.path.exists(path):
        fail(f"fitting a budget needs validation text: no {path} (pass --data_dir and --dataset)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    gen, T = torch.Generator().manual_seed(seed), cfg.block_size
    batches = []
    for _ in range(ttt_batches):
        ix = torch.randint(len(data) - T, (ttt_batch_size,), generator=gen).tolist()
        x = torch.from_numpy(np.stack([data[i:i + T] for i in ix]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in ix]).astype(np.int64)).to(device)
        batches.append((x, y))
    return batches


dial = None
if cfg.n_exp:
    t0 = time.time()
    try:
        dial = make_policy(model, policy, width, budget or None, gamma, k,
                           calibration_batches() if budget and policy != "uniform" else None, w_min, ttt_lr=ttt_lr)
    except ValueError as e:
        fail(str(e))
    fitted = f" (fitted in {time.time() - t0:.1f}s)" if budget and policy != "uniform" else ""
    print(f"operating point: policy {policy}, width {dial!r}, k_exp {k}{fitted}")
full = model.flops_breakdown(1.0, k)   # the reference: every expert at full width, at this k_exp
print(f"full width at k_exp={k}: {full['total'] / 1e6:.3f} MFLOPs/token ({full['experts'] / 1e6:.3f} in the experts)")
if compile:
    model = torch.compile(model)

x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
with torch.no_grad(), ctx:
    for _ in range(num_samples):
        t0 = time.time()
        y, spent = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, width=dial,
                                  k_exp=k, use_cache=use_cache)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        print(decode(y[0].tolist()))
        spent_experts = spent - full["non_expert"]
        print(f"--- spent {spent / 1e6:.3f} MFLOPs/token ({spent / full['total']:.1%} of full width; experts "
              f"{spent_experts / full['experts'] if full['experts'] else 0:.1%}), {max_new_tokens / dt:.1f} tokens/s")
        print("---------------")
