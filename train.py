"""
Train a MoSE (or a plain MoE, or a dense GPT) language model. One device:

    python train.py config/train_shakespeare_mose.py

DDP on 4 GPUs of one node (gloo instead of nccl on CPU):

    torchrun --standalone --nproc_per_node=4 train.py config/train_owt_mose_small.py

Every global below is a config key: override it in a config file or with --key=value.
"""

import json
import math
import os
import pickle
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from configurator import check_ranges, configure, fail, setup_device
from checkpoint import check_tokenizer, load_checkpoint, save_checkpoint
from model import GPT, GPTConfig, MoSELayer, RandomWidth, check_width

# -----------------------------------------------------------------------------
# defaults: a small MoSE on character-level Shakespeare, trained with the shipped recipe (random_pair). The main
# job, config/train_shakespeare_mose.py, adds what a fair comparison needs: experts of 2 * n_embd (two active cost
# one dense MLP), evaluation at k = 1 and 4, and a compute budget (max_train_flops) instead of a step count
# I/O
out_dir = "out"
eval_interval = 250
log_interval = 10
eval_iters = 20                 # batches per evaluation (the same batches at every width, every time)
eval_only = False               # evaluate once and exit
always_save_checkpoint = False  # else only when the full-width val loss improves
init_from = "scratch"           # 'scratch', 'resume' (from out_dir), or 'upcycle:<dir>' (a dense/MoE ckpt)
upcycle_reorder = True          # upcycling: put each expert's most important hidden units first
wandb_log = False
wandb_project = "nanomose"
wandb_run_name = "run"
# data
data_dir = "data"               # prepare_data.py writes <data_dir>/<dataset>/{train,val}.bin
dataset = "shakespeare_char"
holdout_tokens = 0              # > 0: the last holdout_tokens of train.bin are never trained on; evaluation
                                # reports them as the 'holdout' split (choose recipes on it, not on val)
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128
# model
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False
n_exp = 8                       # 0 = dense GPT
k_exp = 2
moe_stride = 2
expert_hidden = 0               # 0 = 4 * n_embd (a GPT-2 MLP per expert; the Shakespeare config halves it)
width_multiple = 1
aux_loss_weight = 0.01
z_loss_weight = 0.001
hr_loss_weight = 0.0            # Elastic MoE hierarchical router loss
# MoSE multi-width training
width_sampling = "random_pair"  # 'random_pair' (the shipped recipe: one pass, a random width per (token, expert)
                                # pair) | 'max_random' (the MoSE paper: full width + a random one) | 'sandwich' |
                                # 'fixed' | 'random_step' | 'none' (a plain MoE run); see sample_widths below
p_full = 0.25                   # random_step / random_pair: probability of the full width (else a random width)
w_min = 0.25                    # narrowest width trained
n_random_widths = 1             # random widths per step (sandwich: besides the widest and the narrowest)
width_grid = 0.25               # > 0: random widths snapped to this grid; 0: continuous. Snapping a uniform draw
                                # halves the end points' share: random_pair's widths 1 / 0.75 / 0.5 / 0.25 come
                                # 37.5 / 25 / 25 / 12.5 % of the time (printed at start-up)
fixed_widths = (1.0, 0.5)       # the widths of width_sampling='fixed'
width_per_layer = False         # each MoE layer draws its own random width
distill_weight = 0.0            # in-place distillation of narrower widths from the widest (detached)
detach_router = False           # passes after the first (the narrower ones of max_random, sandwich, fixed) leave
                                # the router's weights alone: only the widest pass trains them
width_data = "same"             # 'same': every width trains on the step's batch (slimmable networks, the
                                # MoSE paper); 'fresh': each width draws its own batch (more text per step)
# elastic top-k
k_sampling = "none"             # 'none' | Matryoshka MoE's variants: 'layer' (each MoE layer k ~ U[k_min, k_max]),
                                # 'capacity' (each layer, P(k) ∝ k^(1/k_tau)), 'step' (one k for all layers),
                                # 'micro' (one per micro-batch), 'top_p' (per token, see top_p); see sample_k
k_min = 1
k_max = 0                       # 0 = k_exp
k_tau = 2.0                     # capacity: P(k) ∝ exp(log(k) / k_tau); the paper's 2 gives P ∝ sqrt(k)
top_p = 0.5                     # top_p: each token takes experts by probability until their mass reaches
                                # top_p, at least 1 and at most k_max (the paper: 0.1 of 96 experts)
k_pool = 0                      # Elastic MoE co-activation sampling from the top-k_pool; 0 = off
# evaluation dials
eval_widths = (1.0, 0.75, 0.5, 0.25)
eval_k = ()                     # k_exp values to evaluate besides the training one, e.g. (1, 4)
# AdamW and schedule
learning_rate = 2e-3            # a small model on few tokens per step takes a large rate
max_iters = 2000                # the configs give a compute budget instead (max_train_flops): an explicit
                                # --max_iters on the command line wins over a config's budget
max_train_flops = 0.0           # > 0: train for this many FLOPs (forward + backward, all passes) instead of
                                # max_iters; the LR schedule then runs on spent compute (see schedule_clock)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99                    # 0.99 rather than 0.95: few tokens per step
grad_clip = 1.0
decay_lr = True
warmup_iters = 50
lr_decay_iters = 0              # 0 = max_iters
min_lr = 2e-4
# system
backend = "auto"                # DDP backend: nccl on cuda, gloo elsewhere
device = "auto"                 # cuda, then mps, then cpu
dtype = "auto"                  # bfloat16 where supported, else float16 on cuda; float32 elsewhere
compile = False                 # torch.compile the model (useful on GPUs; the dispatch loop breaks graphs)
seed = 1337
command_line = set()            # the keys given as --key=value (filled by configure)
config = configure(globals(), given=command_line)
# -----------------------------------------------------------------------------

# checks that fail early with one line, rather than deep inside a run: every number in its range first
at_least = lambda n: (lambda v: v >= n, f">= {n}")
below_one = (lambda v: 0 <= v < 1, "in [0, 1)")
probability = (lambda v: 0 <= v <= 1, "a probability in [0, 1]")
check_ranges(config, {
    **{k: at_least(1) for k in ("n_layer", "n_head", "n_embd", "k_exp", "moe_stride", "width_multiple", "k_min",
                                "batch_size", "block_size", "gradient_accumulation_steps", "eval_interval",
                                "log_interval", "eval_iters")},
    **{k: at_least(0) for k in ("n_exp", "expert_hidden", "k_max", "k_pool", "n_random_widths", "max_iters",
                                "max_train_flops", "holdout_tokens", "warmup_iters", "lr_decay_iters", "min_lr",
                                "weight_decay", "grad_clip", "aux_loss_weight", "z_loss_weight", "hr_loss_weight",
                                "distill_weight", "seed")},
    "learning_rate": (lambda v: v > 0, "> 0"), "k_tau": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "a probability mass in (0, 1]"),
    "dropout": below_one, "beta1": below_one, "beta2": below_one, "p_full": probability,
    "width_grid": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = continuous)"),
})
WIDTH_SAMPLING = ("random_pair", "max_random", "sandwich", "fixed", "random_step", "none")
if width_sampling not in WIDTH_SAMPLING:
    fail(f"width_sampling must be one of {', '.join(WIDTH_SAMPLING)}, got '{width_sampling}'")
if width_data not in ("same", "fresh"):
    fail(f"width_data must be same or fresh, got '{width_data}'")
if width_data == "fresh" and distill_weight > 0:
    fail("in-place distillation needs every width on the same batch: use width_data='same'")
K_SAMPLING = ("none", "layer", "capacity", "step", "micro", "top_p")
if k_sampling not in K_SAMPLING:
    fail(f"k_sampling must be one of {', '.join(K_SAMPLING)}, got '{k_sampling}'")
if k_sampling == "top_p" and (k_min != 1 or k_pool):
    fail("k_sampling='top_p' gives each token 1 to k_max experts by probability: leave k_min at 1 and k_pool at 0")
if "max_iters" in command_line and max_train_flops:   # nanoGPT's habit, --max_iters=40 for a quick run, wins
    if "max_train_flops" in command_line:
        fail("--max_iters and --max_train_flops both set the run's length: give one of them")
    print(f"--max_iters={max_iters} on the command line wins: the config's compute budget (max_train_flops="
          f"{max_train_flops:g}) is not used")
    max_train_flops = 0.0
one_pass = width_sampling in ("random_step", "none") or width_sampling == "random_pair" and not distill_weight
if detach_router and one_pass:
    fail(f"detach_router acts on the passes after the first, and width_sampling='{width_sampling}' has one pass: "
         "use max_random, sandwich or fixed")
if width_sampling == "fixed" and not fixed_widths:
    fail("width_sampling='fixed' trains the widths in fixed_widths: give at least one, e.g. --fixed_widths=1.0,0.5")
k_max = k_max or k_exp
lr_decay_iters = lr_decay_iters or max_iters
try:
    check_width(w_min, "w_min")
    for w in fixed_widths:
        check_width(w, "fixed_widths values")
    for w in eval_widths:
        check_width(w, "eval_widths values")
    gptconf = GPTConfig(block_size=block_size, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                        dropout=dropout, bias=bias, n_exp=n_exp, k_exp=k_exp, moe_stride=moe_stride,
                        expert_hidden=expert_hidden, width_multiple=width_multiple, aux_loss_weight=aux_loss_weight,
                        z_loss_weight=z_loss_weight, hr_loss_weight=hr_loss_weight)
    if n_exp and not 1 <= k_min <= k_max <= n_exp:
        raise ValueError(f"need 1 <= k_min <= k_max <= n_exp, got k_min={k_min}, k_max={k_max}, n_exp={n_exp}")
    if n_exp and k_pool and not k_exp < k_pool <= n_exp:
        raise ValueError(f"k_pool must be in (k_exp, n_exp] = ({k_exp}, {n_exp}], got {k_pool}")
    if n_exp and any(not 1 <= k <= n_exp for k in eval_k):
        raise ValueError(f"eval_k values must be in [1, n_exp={n_exp}], got {eval_k}")
except ValueError as e:
    fail(str(e))
if n_exp == 0:   # a dense GPT has no dials to train or evaluate
    width_sampling, k_sampling, k_pool, eval_widths, eval_k = "none", "none", 0, (1.0,), ()

# DDP: torchrun sets RANK; every rank runs this same script
ddp = int(os.environ.get("RANK", -1)) != -1
device, device_type, dtype, ctx = setup_device(device, dtype)
if ddp:
    from torch.distributed import barrier, destroy_process_group, init_process_group
    from torch.nn.parallel import DistributedDataParallel as DDP
    init_process_group(backend=("nccl" if device.startswith("cuda") else "gloo") if backend == "auto" else backend)
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))

    def lost_a_rank(kind, error, tb, default=sys.excepthook):
        """When a rank dies, the others fail in their next collective: one line saying so rather than a
        traceback from inside the backend. The rank that died prints its own error (torchrun: 'Root Cause')."""
        if not (isinstance(error, torch.distributed.DistError) or
                (isinstance(error, RuntimeError) and any(s in str(error) for s in ("gloo", "NCCL", "Connection")))):
            return default(kind, error, tb)
        why = str(error).splitlines()[0]
        why = why.split("] ", 1)[-1] if why.startswith("[") else why   # drop the backend's source location
        print(f"train.py: rank {ddp_rank} stopped: another rank left the job ({why.split('. ')[0][:120]}); "
              f"its own error, printed by that rank, says why", file=sys.stderr)
    sys.excepthook = lost_a_rank
    if device.startswith("cuda"):
        device = f"cuda:{ddp_local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % ddp_world_size:
        fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the "
             f"number of processes ({ddp_world_size})")
    gradient_accumulation_steps //= ddp_world_size
else:
    ddp_rank, ddp_world_size = 0, 1
master_process = ddp_rank == 0
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    print(f"device {device}, dtype {dtype}, {ddp_world_size} process(es), tokens per iteration {tokens_per_iter:,}")
torch.manual_seed(seed + ddp_rank)   # dropout differs per rank; data and widths come from shared generators
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data: uint16 memmaps from prepare_data.py, sampled i.i.d. with a generator that every rank seeds alike.
# Each step draws all its micro-batches at once and rank r takes its share, so a run on N processes sees
# exactly the batches of a 1-process run with N times the gradient accumulation. The generator's state is
# the data position: it goes into the checkpoint, and resuming continues the same stream.
split_dir = os.path.join(data_dir, dataset)
for split in ("train", "val"):
    path = os.path.join(split_dir, f"{split}.bin")
    if not os.path.exists(path):
        fail(f"no {path}: run `python prepare_data.py {dataset}` first (or set --data_dir)")
    if os.path.getsize(path) // 2 - (holdout_tokens if split == "train" else 0) <= block_size:   # 2 bytes a token
        fail(f"{path} has {os.path.getsize(path) // 2} tokens, too few for one window of block_size {block_size} "
             f"+ 1" + (f" after holding out {holdout_tokens}" if split == "train" and holdout_tokens else "")
             + ": use more text or a smaller --block_size")
if 0 < holdout_tokens <= block_size:
    fail(f"holdout_tokens ({holdout_tokens}) must exceed block_size ({block_size}) to hold one window, or be 0")
meta_path = os.path.join(split_dir, "meta.pkl")
try:
    gpt2_meta = {"tokenizer": "gpt2", "vocab_size": 50257}
    meta = pickle.load(open(meta_path, "rb")) if os.path.exists(meta_path) else gpt2_meta
    meta["tokenizer"], meta["vocab_size"]
except Exception as e:   # a truncated or foreign file: prepare_data.py writes it again
    fail(f"{meta_path} is not a meta.pkl of prepare_data.py ({type(e).__name__}): run `python prepare_data.py "
         f"{dataset}` again")
gptconf.vocab_size = meta["vocab_size"] if meta["tokenizer"] == "char" else 50304   # 50257 padded to 64s
data_gen = torch.Generator().manual_seed(seed)
width_gen = torch.Generator().manual_seed(seed + 1)     # widths and k: identical on every rank


def load_split(split):
    """'train' (less its held-out tail), 'holdout' (that tail) or 'val', as a uint16 memmap.
    A fresh memmap per call: a long-lived one grows memory (numpy keeps pages it touched)."""
    data = np.memmap(os.path.join(split_dir, f"{'val' if split == 'val' else 'train'}.bin"), dtype=np.uint16, mode="r")
    if split == "val" or not holdout_tokens:
        return data
    return data[:-holdout_tokens] if split == "train" else data[-holdout_tokens:]


def to_device(ix, data):
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device_type == "cuda":   # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_step_batches():
    """This rank's micro-batches for one optimizer step."""
    data = load_split("train")
    ix = torch.randint(len(data) - block_size, (gradient_accumulation_steps * ddp_world_size, batch_size),
                       generator=data_gen)
    return [to_device(ix[m * ddp_world_size + ddp_rank], data) for m in range(gradient_accumulation_steps)]


# -----------------------------------------------------------------------------
# model: from scratch, resumed, or upcycled from a dense / plain-MoE checkpoint
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "n_exp", "k_exp", "moe_stride",
                "expert_hidden", "width_multiple")


def require_same(saved, keys, why, where):
    """Fail unless a saved model's config agrees with this run's on `keys` (its weights fix them)."""
    for key in keys:
        if getattr(saved, key) != getattr(gptconf, key):
            raise ValueError(f"{why}: {key} is {getattr(saved, key)} in {where}, {getattr(gptconf, key)} here "
                             f"(set --{key}={getattr(saved, key)})")


# training compute spent so far: FLOPs (forward + backward of every pass, all ranks) and tokens trained on
iter_num, best_val_loss, train_flops, train_tokens, checkpoint = 0, float("inf"), 0.0, 0, None
log_bytes = 0   # how much of log.jsonl belongs to the run being continued (a resume reads it from the checkpoint)
try:
    if init_from == "scratch":
        model = GPT(gptconf)
    elif init_from == "resume":
        saved, checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        # the architecture must match; dropout and the router-loss weights are this run's to choose
        check_tokenizer(checkpoint.get("meta") or meta, split_dir)   # the same ids must mean the same text
        require_same(saved.config, ARCHITECTURE, "resume keeps the architecture", "the checkpoint")
        model = GPT(gptconf)
        model.load_state_dict(saved.state_dict())
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        train_flops, train_tokens = checkpoint.get("train_flops", 0.0), checkpoint.get("train_tokens", 0)
        log_bytes = checkpoint.get("log_bytes")   # None: a checkpoint from before logs were truncated
    elif init_from.startswith("upcycle:"):
        model = None   # built below, once the helpers are defined
    else:
        raise ValueError(f"init_from must be scratch, resume or upcycle:<dir>, got '{init_from}'")
except (ValueError, FileNotFoundError) as e:
    fail(str(e))


@torch.no_grad()
def hidden_unit_importance(model, batches):
    """For every MoE layer, (n_exp, H): how much each expert's hidden unit contributes on real tokens,
    mean |activation| over the tokens routed to the expert times the norm of the unit's output weights."""
    inputs, hooks = {}, []
    for block in model.transformer.h:
        if isinstance(block.mlp, MoSELayer):
            hooks.append(block.mlp.register_forward_pre_hook(
                lambda mod, args: inputs.setdefault(mod, []).append(args[0].reshape(-1, args[0].size(-1)))))
    for x, _ in batches:
        model(x)
    for h in hooks:
        h.remove()
    importance = {}
    for layer, xs in inputs.items():
        x = torch.cat(xs)
        routing = layer.router(x, model.config.k_exp)
        ex = layer.experts
        score = torch.zeros(ex.c_fc.size(0), ex.hidden, device=x.device)
        for e in range(ex.c_fc.size(0)):
            rows = x[(routing.expert_idx == e).any(dim=1)]
            if len(rows):
                a = rows @ ex.c_fc[e] + (ex.b_fc[e] if ex.b_fc is not None else 0)
                score[e] = F.gelu(a).abs().mean(dim=0)
        importance[layer] = score * ex.c_proj.norm(dim=2)
    return importance


def upcycle(source_dir):
    """Build the configured MoE/MoSE model from a trained dense or MoE checkpoint: attention, embeddings and
    norms are copied; a dense MLP is copied into every expert (sparse upcycling), an MoE layer's router and
    experts are kept. Then each expert's hidden units are reordered by importance so the narrow prefixes
    start from the most useful units."""
    source, source_checkpoint = load_checkpoint(os.path.join(source_dir, "ckpt.pt"))
    check_tokenizer(source_checkpoint.get("meta") or meta, split_dir)
    require_same(source.config, ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"),
                 "upcycling keeps the architecture", source_dir)
    target = GPT(gptconf)
    missing = target.load_state_dict({k: v for k, v in source.state_dict().items() if ".mlp." not in k},
                                     strict=False).missing_keys
    assert all(".mlp." in k for k in missing), missing
    for src, dst in zip(source.transformer.h, target.transformer.h):
        if not isinstance(dst.mlp, MoSELayer):
            if isinstance(src.mlp, MoSELayer):
                raise ValueError("upcycling cannot turn an MoE layer back into a dense one: match moe_stride")
            dst.mlp.load_state_dict(src.mlp.state_dict())
        elif isinstance(src.mlp, MoSELayer):
            require_same(source.config, ("n_exp", "expert_hidden"), "upcycling keeps an MoE layer's experts",
                         source_dir)
            dst.mlp.load_state_dict(src.mlp.state_dict())
        else:
            if gptconf.expert_hidden != 4 * gptconf.n_embd:
                raise ValueError(f"upcycling a dense MLP needs expert_hidden = 4 * n_embd = {4 * gptconf.n_embd}")
            with torch.no_grad():
                dst.mlp.experts.c_fc.copy_(src.mlp.c_fc.weight.T.expand_as(dst.mlp.experts.c_fc))
                dst.mlp.experts.c_proj.copy_(src.mlp.c_proj.weight.T.expand_as(dst.mlp.experts.c_proj))
                if gptconf.bias:
                    dst.mlp.experts.b_fc.copy_(src.mlp.c_fc.bias.expand_as(dst.mlp.experts.b_fc))
                    dst.mlp.experts.b_proj.copy_(src.mlp.c_proj.bias.expand_as(dst.mlp.experts.b_proj))
    target.to(device)   # the importance pass runs on real batches, which live on the device
    if upcycle_reorder:
        for layer, score in hidden_unit_importance(target, [get_step_batches()[0] for _ in range(4)]).items():
            layer.experts.reorder_hidden_units_(score)
    return target


if model is None:
    try:
        model = upcycle(init_from.split(":", 1)[1])
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    print(f"upcycled from {init_from.split(':', 1)[1]}" + (" with hidden units reordered" if upcycle_reorder else ""))
model.to(device)
# The schedule's clock. With max_iters it counts steps. With a compute budget (max_train_flops) it counts the
# FLOPs spent in units of one plain-MoE step (full width, training k, one pass): warmup_iters and the cosine
# then cover the same compute whatever a step of this recipe costs, so "a MoE at MoSE's compute" is one flag.
flops_per_moe_step = 3 * model.flops_per_token() * tokens_per_iter   # forward + backward (2x forward)
if max_train_flops:
    max_iters = lr_decay_iters = max_train_flops / flops_per_moe_step


def schedule_clock():
    return train_flops / flops_per_moe_step if max_train_flops else iter_num


def finished():
    # a hair of tolerance: a plain MoE's FLOPs are summed step by step and must end exactly at its budget
    return train_flops >= max_train_flops * (1 - 1e-9) if max_train_flops else iter_num >= max_iters


if master_process:
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M, forward FLOPs/token at full width: "
          f"{model.flops_per_token() / 1e6:.2f}M" + (f"; training budget {max_train_flops:.3e} FLOPs = "
          f"{max_iters:.1f} plain-MoE steps" if max_train_flops else ""))
    if n_exp and width_sampling == "random_pair":   # what the recipe really draws (snapping skews a uniform draw)
        mix = RandomWidth(p_full, w_min, width_grid).mix()
        print("random_pair: each (token, expert) pair draws its width, " + (", ".join(
            f"{w:g} with probability {p:.3f}" for w, p in mix.items()) if mix else
            f"1 with probability {p_full:g}, else uniform in [{w_min:g}, 1]"))
# GradScaler only for float16 on cuda: bf16 has fp32's range, and fp32 needs no scaling
scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "float16" and device_type == "cuda"))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:   # empty when saved by a disabled scaler (fp32/bf16): a new one starts fresh
        scaler.load_state_dict(checkpoint["scaler"])
    data_gen.set_state(checkpoint["rng"]["data"])
    width_gen.set_state(checkpoint["rng"]["width"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device_type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
checkpoint = None   # free memory
raw_model = model   # evaluation and checkpoints always use the plain, unwrapped module
if compile:
    print("compiling the model... (takes a minute)")
    model = torch.compile(model)
if ddp:   # a router left alone by the step's last pass has no gradient there: DDP must look for it
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None,
                find_unused_parameters=detach_router)
# the issue-9 hypothesis that the narrow passes pull the router away from what the full width needs
router_weights = [m.router.w_g.weight for m in raw_model.modules() if isinstance(m, MoSELayer)] if detach_router \
    else []


# -----------------------------------------------------------------------------
# the MoSE recipe: which widths (and k) this step trains


def random_width():
    u = w_min + (1 - w_min) * torch.rand((), generator=width_gen).item()
    return min(1.0, max(w_min, round(u / width_grid) * width_grid)) if width_grid else u


def sample_widths():
    """The widths trained this step, one forward/backward pass each; the widest comes first (it is the
    distillation teacher). A pass's width is a float, a list (one per MoE layer) or a WidthPolicy."""
    rand = lambda: [random_width() for _ in range(gptconf.n_moe_layers)] if width_per_layer else random_width()
    if width_sampling == "none":
        return [1.0]
    if width_sampling == "random_step":  # one pass: the full width with probability p_full, else a random one
        return [1.0 if torch.rand((), generator=width_gen).item() < p_full else rand()]
    if width_sampling == "random_pair":  # one pass: every (token, expert) pair draws its own width; with
        # distillation a full-width pass comes first, as the teacher (it costs a plain-MoE step more)
        return [1.0] * (distill_weight > 0) + [RandomWidth(p_full, w_min, width_grid)]   # draws: width_of()
    if width_sampling == "max_random":   # the MoSE paper: the full width plus a random one
        return [1.0] + [rand() for _ in range(n_random_widths)]
    if width_sampling == "sandwich":     # slimmable networks: the widest, the narrowest, random ones between
        return [1.0, w_min] + [rand() for _ in range(n_random_widths)]
    return sorted(fixed_widths, reverse=True)


def width_of(width, micro_step):
    """A pass's width for this rank's micro-batch. random_pair draws from a generator of each micro-batch's own,
    seeded by the step and the micro-batch's index among all ranks': N processes draw exactly what one process
    with N times the gradient accumulation draws, and a resumed run what it would have drawn."""
    if not isinstance(width, RandomWidth):
        return width
    micro_batch = micro_step * ddp_world_size + ddp_rank
    g = torch.Generator().manual_seed(seed + 1_000_003 * iter_num + micro_batch)
    return RandomWidth(width.p_full, width.w_min, width.grid, g)


def sample_k():
    """Experts per token this step (Matryoshka MoE), as forward's k_exp: one per MoE layer (layer, capacity),
    one for all layers (step), None for the training k, or the most a token may take (top_p). 'micro' draws
    one for each micro-batch of the step, all ranks' (as get_step_batches draws the data): k_of() picks."""
    draw = lambda: int(torch.randint(k_min, k_max + 1, (), generator=width_gen))
    if k_sampling == "layer":
        return [draw() for _ in range(gptconf.n_moe_layers)]
    if k_sampling == "capacity":   # P(k) ∝ exp(log(k) / tau) = k^(1/tau): the larger k, the more often
        p = torch.arange(k_min, k_max + 1, dtype=torch.float64) ** (1 / k_tau)
        return (k_min + torch.multinomial(p, gptconf.n_moe_layers, replacement=True, generator=width_gen)).tolist()
    if k_sampling == "micro":
        return [draw() for _ in range(gradient_accumulation_steps * ddp_world_size)]
    if k_sampling == "top_p":      # the router picks each token's k; k_max caps it
        return k_max
    return draw() if k_sampling == "step" else None


def k_of(ks, micro_step):
    """The k_exp of this rank's micro-batch number micro_step, from sample_k's draw for the step."""
    return ks[micro_step * ddp_world_size + ddp_rank] if k_sampling == "micro" else ks


route_top_p = top_p if k_sampling == "top_p" else None   # forward's top_p: routing by probability mass


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr; `it` is the schedule clock (steps, or spent compute in
    full-width steps when max_train_flops is set: a float)."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:   # linear warmup, non-zero at step 0
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# full width at the training k always comes first: it is the val loss that picks the best checkpoint
eval_dials = [(1.0, None)] + [(w, None) for w in eval_widths if w != 1.0] + [(1.0, k) for k in eval_k if k != k_exp]


@torch.no_grad()
def evaluate():
    """Validation cross-entropy (no router losses) at every evaluation dial, plus train at full width.
    The batches come from a fixed generator, so every dial and every evaluation sees the same text."""
    raw_model.eval()
    results = {}
    splits = (("train", [(1.0, None)]), ("val", eval_dials)) + ((("holdout", eval_dials),) if holdout_tokens else ())
    for split, dials in splits:
        gen, data = torch.Generator().manual_seed(seed + 2), load_split(split)
        batches = [torch.randint(len(data) - block_size, (batch_size,), generator=gen) for _ in range(eval_iters)]
        for w, k in dials:
            losses = []
            for ix in batches:
                x, y = to_device(ix, data)
                with ctx:
                    losses.append(raw_model(x, y, width=w if n_exp else None, k_exp=k).loss.item())
            results[(split, w, k)] = sum(losses) / len(losses)
    raw_model.train()
    return results


def dial_name(w, k):
    return f"w={w:g}" + (f",k={k}" if k else "")


def save(iter_num, best_val_loss):
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        save_checkpoint({
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "model_args": asdict(gptconf), "iter_num": iter_num, "best_val_loss": best_val_loss,
            "train_flops": train_flops, "train_tokens": train_tokens, "log_bytes": log_bytes,
            "config": config, "meta": meta,   # the tokenizer travels with the weights
            "rng": {"data": data_gen.get_state(), "width": width_gen.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
        }, path)
    except OSError as e:   # a full disk, a quota, a lost mount: save_checkpoint has left the old file alone
        last = f"the last good checkpoint, {path}, is intact" if os.path.exists(path) else "no checkpoint was saved"
        fail(f"could not write the checkpoint of iter {iter_num} ({e.strerror or e}); {last}: free space in "
             f"{out_dir} and continue with --init_from=resume")


# peak dense bf16/fp16 tensor FLOP/s by GPU name, for MFU; elsewhere MFU is not printed
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
peak_flops = None
if device_type == "cuda":
    name = torch.cuda.get_device_name()
    peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
# log.jsonl continues from the checkpoint: what a killed run logged after it (and a line torn by the kill) is
# cut off, since the resumed run logs those steps again. A run from scratch or upcycled starts a new log.
log_path = os.path.join(out_dir, "log.jsonl")
if master_process and log_bytes is not None and os.path.exists(log_path) and os.path.getsize(log_path) > log_bytes:
    os.truncate(log_path, log_bytes)
log_file = open(log_path, "a") if master_process else None


def log(row):
    if log_file:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
    if wandb_log and master_process:
        wandb.log(row)


def stop_non_finite(widths, ks, batches, loss, grad_norm):
    """Fail with one line naming the step, its dials and the first module (in the order modules finish)
    whose output holds a non-finite value while its inputs do not: where the inf or NaN is born, even when
    it is born outside any submodule's call (a Dropout after it would otherwise be blamed). Found by running
    the step's forward passes again with hooks."""
    first = []
    finite = lambda ts: all(torch.isfinite(t).all() for t in (ts if isinstance(ts, (tuple, list)) else (ts,))
                            if torch.is_tensor(t) and t.is_floating_point())

    def check(module, args, output):
        if not first and finite(args) and not finite(output):
            first.append(module)
    hooks = [m.register_forward_hook(check) for m in raw_model.modules()]
    with torch.no_grad(), ctx:
        for i, width in enumerate(widths):
            for micro_step, (X, Y) in enumerate(batches[i]):
                if not first:
                    raw_model(X, Y, width=width_of(width, micro_step) if n_exp else None, k_exp=k_of(ks, micro_step),
                              k_pool=k_pool or None, top_p=route_top_p)
                    at_width = width
    for h in hooks:
        h.remove()
    names = {m: name or "GPT" for name, m in raw_model.named_modules()}
    rounded = lambda v: [rounded(x) for x in v] if isinstance(v, (list, tuple)) else \
        round(v, 4) if isinstance(v, float) else v   # a width is a float, a list or a policy
    where = (f"first non-finite output (from finite inputs) in {names[first[0]]} ({type(first[0]).__name__}) at "
             f"width {rounded(at_width)}"
             if first else f"every forward output is finite, the gradients are not (grad norm {grad_norm})")
    path = os.path.join(out_dir, "ckpt.pt")
    kept = f"{path} (the last good checkpoint) is untouched" if os.path.exists(path) else "no checkpoint was saved"
    fail(f"non-finite training step {iter_num + 1} (loss {loss}, grad norm {grad_norm}), widths {rounded(widths)}, k "
         f"{ks if ks is not None else k_exp}: {where}; stopped before the update, {kept}. Lower --learning_rate, "
         f"raise --warmup_iters or use --dtype=float32")


# -----------------------------------------------------------------------------
# the training loop
t0, flops_done, tokens_done, iters_done = time.time(), 0.0, 0, 0   # since the last log line
while True:
    lr = get_lr(schedule_clock())
    for group in optimizer.param_groups:
        group["lr"] = lr

    if (iter_num % eval_interval == 0 or finished()) and master_process:
        results = evaluate()
        val = results[("val", 1.0, None)]
        print(f"step {iter_num}: train {results[('train', 1.0, None)]:.4f}, val "
              + ", ".join(f"{dial_name(w, k)} {results[('val', w, k)]:.4f}" for w, k in eval_dials))
        log_bytes = log_file.tell() if log_file else 0   # a resume from this iter logs this evaluation again
        log({"iter": iter_num, "lr": lr, "train_flops": train_flops, "train_tokens": train_tokens,
             **{f"{s}/{dial_name(w, k)}": v for (s, w, k), v in results.items()}})
        improved = val < best_val_loss
        best_val_loss = min(best_val_loss, val)
        if iter_num > 0 and (improved or always_save_checkpoint):
            print(f"saving checkpoint to {out_dir}")
            save(iter_num, best_val_loss)
        t0, flops_done, tokens_done, iters_done = time.time(), 0.0, 0, 0   # evaluation is not training time
    if finished() or eval_only:
        break

    # one optimizer step: every micro-batch at every sampled width, gradients summed
    widths, ks = sample_widths(), sample_k()
    batches = get_step_batches()
    batches = [batches] + [get_step_batches() if width_data == "fresh" else batches for _ in widths[1:]]
    full_loss = torch.zeros((), device=device)
    step_flops = 0.0   # this rank's training FLOPs in this step
    for micro_step in range(gradient_accumulation_steps):
        teacher = None
        for i, width in enumerate(widths):
            X, Y = batches[i][micro_step]
            for w in router_weights:
                w.requires_grad_(i == 0)   # the trunk still learns through the gates; the router's weights do not
            if ddp:   # sync gradients only on the very last backward of the step (flat, instead of no_sync())
                sync_now = micro_step == gradient_accumulation_steps - 1 and i == len(widths) - 1
                model.require_backward_grad_sync = sync_now
            with ctx:
                out = model(X, Y, width=width_of(width, micro_step) if n_exp else None, k_exp=k_of(ks, micro_step),
                            k_pool=k_pool or None, top_p=route_top_p)
                loss = out.loss + out.router_loss
                if teacher is not None:   # in-place distillation: learn the widest width's predictions too
                    kd = -(F.softmax(teacher, -1) * F.log_softmax(out.logits.float(), -1)).sum(-1).mean()
                    loss = loss + distill_weight * kd
            if i == 0:
                full_loss += out.loss.detach() / gradient_accumulation_steps
                teacher = out.logits.detach().float() if distill_weight > 0 else None
            # what this pass really spent (a narrow or per-pair width spends less), forward + backward
            step_flops += 3 * out.stats["flops_per_token"].item() * X.numel()
            scaler.scale(loss / gradient_accumulation_steps).backward()
    grad_norm = torch.zeros((), device=device)
    if grad_clip:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # a non-finite loss or gradient stops the run before the update, so the weights, and every checkpoint,
    # stay good. One sync per step; under float16 the GradScaler skips steps with inf gradients by design.
    if not torch.isfinite(full_loss + (0 if scaler.is_enabled() else grad_norm)).item():
        stop_non_finite(widths, ks, batches, full_loss.item(), grad_norm.item() if grad_clip else "not computed")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ddp:   # every rank must agree on the spent compute: the budget decides when all of them stop
        summed = torch.tensor(step_flops, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        step_flops = summed.item()
    train_flops += step_flops
    step_tokens = tokens_per_iter * (len(widths) if width_data == "fresh" else 1)   # 'fresh': a batch per width
    train_tokens += step_tokens
    flops_done += step_flops
    tokens_done += step_tokens
    iters_done += 1
    iter_num += 1

    if iter_num % log_interval == 0 and master_process:
        lossf = full_loss.item()   # finite: every step was checked before its update
        dt = time.time() - t0
        flops_rate = flops_done / dt   # all ranks
        mfu = f", mfu {100 * flops_rate / ddp_world_size / peak_flops:.1f}%" if peak_flops else ""
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {1000 * dt / iters_done:.0f} ms/iter, "
              f"{tokens_done / dt:,.0f} tok/s, {flops_rate / 1e12:.3f} TFLOP/s{mfu}")
        load = [[round(f, 4) for f in layer.tolist()] for layer in out.stats["load"]]   # last pass, per MoE layer
        log({"iter": iter_num, "loss": lossf, "lr": lr, "train_flops": train_flops, "train_tokens": train_tokens,
             "widths": [repr(w) if isinstance(w, RandomWidth) else w for w in widths], "k": ks, "expert_load": load,
             **({"experts_per_token": out.stats["experts_per_token"]} if route_top_p else {})})   # last pass
        t0, flops_done, tokens_done, iters_done = time.time(), 0.0, 0, 0

if master_process and iter_num > 0:
    print(f"\ntrained {iter_num} steps on {train_tokens:,} tokens with {train_flops:.4e} FLOPs "
          f"({train_flops / flops_per_moe_step:.1f} plain-MoE steps of compute)")
    if holdout_tokens:
        print("held-out training text: " + ", ".join(f"{dial_name(w, k)} {results[('holdout', w, k)]:.4f}"
                                                    for w, k in eval_dials))
    print("final validation loss (cross-entropy, no router losses):")
    print(f"{'dial':>12} {'val loss':>9} {'FLOPs/token':>12}")
    for w, k in eval_dials:
        print(f"{dial_name(w, k):>12} {results[('val', w, k)]:9.4f} "
              f"{raw_model.flops_per_token(w if n_exp else 1.0, k) / 1e6:11.3f}M")
if ddp:   # wait for rank 0 to finish its last checkpoint: a rank that tears down first can abort the job
    barrier()
    # DDP holds the process group: release it first, so gloo's threads end now, not while the interpreter
    # is being torn down (where they abort the process: "terminate called without an active exception")
    del model
    destroy_process_group()
