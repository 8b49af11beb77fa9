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
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from configurator import (check_ranges, configure, fail, gpu_peak_flops, heap_trimmer, report_lost_rank, setup_device,
                          stop_non_finite)
from checkpoint import (ARCHITECTURE, check_tokenizer, held_out_authors, load_checkpoint, load_meta, open_log,
                        require_same, save_checkpoint, upcycle)
from model import GPT, GPTConfig, MoSELayer, check_width
from recipes import RandomWidth, Recipe, describe, distill_loss, k_of, sample_k, sample_widths, width_of

# -----------------------------------------------------------------------------
# defaults: a small MoSE on character-level Shakespeare, trained with the shipped recipe (random_pair). The main
# job, config/train_shakespeare_mose.py, adds what a fair comparison needs: experts of 2 * n_embd (two active cost
# one dense MLP), evaluation at k = 1 and 4, and a training compute (max_train_flops) instead of a step count
# I/O
out_dir = "out"
eval_interval = 250
log_interval = 10
eval_iters = 20                 # batches per evaluation (the same batches at every width, every time)
eval_only = False               # evaluate once and exit
always_save_checkpoint = False  # else only when the full-width val loss improves
init_from = "scratch"           # 'scratch', 'resume' (from out_dir), or 'upcycle:<dir>' (a dense/MoE ckpt)
upcycle_reorder = True          # upcycling: put each expert's most important hidden units first
wandb_log = False; wandb_project = "nanomose"; wandb_run_name = "run"
# data
data_dir = "data"               # prepare_data.py writes <data_dir>/<dataset>/{train,val}.bin
dataset = "shakespeare_char"
holdout_tokens = 0              # > 0: the last holdout_tokens of train.bin are never trained on; evaluation
                                # reports them as the 'holdout' split (choose recipes on it, not on val)
holdout_authors = 0             # > 0: the last holdout_authors authors of train.bin instead (Gutenberg's meta.pkl)
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
# the training recipe: recipes.py draws each step's widths and k (its header lists every recipe with its cost)
width_sampling = "random_pair"  # random_pair (shipped: one pass, a width per (token, expert) pair) | max_random
                                # (the MoSE paper: full width + random ones) | sandwich | fixed | random_step | none
p_full = 0.25                   # random_step / random_pair without a width_mix: P(full width), else a random one
w_min = 0.25                    # narrowest width trained
width_mix = (0.25, 0.25, 0.25, 0.25)  # P(each grid width), widest first: the law of every random width (shipped:
                                # uniform on 1 / 0.75 / 0.5 / 0.25, RESULTS.md, issue 32); () = p_full, else snapped
p_sequence = 0.5                # random_pair: this share of sequences runs one width in all pairs and MoE layers,
                                # the uniform dial's "every expert narrow", which per-pair draws almost never show
n_random_widths = 1             # random widths per step (sandwich: besides the widest and the narrowest)
width_grid = 0.25               # > 0: random widths snapped to this grid (the mix is printed at start-up); 0: not
fixed_widths = (1.0, 0.5)       # the widths of width_sampling='fixed'
width_per_layer = False         # each MoE layer draws its own random width
distill_weight = 0.0            # in-place distillation of narrower widths from the widest (detached)
detach_router = False           # only the first, widest pass trains the router's weights
width_data = "same"             # 'same': every width trains on the step's batch; 'fresh': each draws its own
k_sampling = "none"             # none | Matryoshka MoE's layer | capacity | step | micro | top_p
k_min = 1; k_max = 0            # the k_sampling range; k_max 0 = k_exp
k_tau = 2.0                     # capacity: P(k) ∝ k^(1/k_tau); the paper's 2 gives P ∝ sqrt(k)
route_top_p = 0.5               # k_sampling top_p: a token's experts until their probability mass reaches this
k_pool = 0                      # Elastic MoE co-activation sampling from the top-k_pool; 0 = off
# evaluation dials
eval_widths = (1.0, 0.75, 0.5, 0.25)
eval_k = ()                     # k_exp values to evaluate besides the training one, e.g. (1, 4)
# AdamW and schedule
learning_rate = 2e-3            # a small model on few tokens per step takes a large rate
max_iters = 2000                # the configs give a training compute instead (max_train_flops): an explicit
                                # --max_iters on the command line wins over a config's max_train_flops
max_train_flops = 0.0           # > 0: train for this many FLOPs (forward + backward, all passes) instead of
                                # max_iters; the LR schedule then runs on spent compute (see schedule_clock)
weight_decay = 0.1
beta1 = 0.9; beta2 = 0.99       # beta2 0.99 rather than 0.95: few tokens per step
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
check_ranges(config, {   # (the recipe's keys are checked by Recipe, below)
    **{k: at_least(1) for k in ("n_layer", "n_head", "n_embd", "k_exp", "moe_stride", "width_multiple", "batch_size",
                                "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                                "eval_iters")},
    **{k: at_least(0) for k in ("n_exp", "expert_hidden", "max_iters", "max_train_flops", "holdout_tokens",
                                "holdout_authors", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay",
                                "grad_clip", "aux_loss_weight", "z_loss_weight", "hr_loss_weight", "seed")},
    "learning_rate": (lambda v: v > 0, "> 0"), "dropout": below_one, "beta1": below_one, "beta2": below_one,
})
if "max_iters" in command_line and max_train_flops:   # nanoGPT's habit, --max_iters=40 for a quick run, wins
    if "max_train_flops" in command_line:
        fail("--max_iters and --max_train_flops both set the run's length: give one of them")
    print(f"--max_iters={max_iters} on the command line wins: the config's training compute (max_train_flops="
          f"{max_train_flops:g}) is not used")
    max_train_flops = 0.0
if holdout_tokens and holdout_authors:
    fail("holdout_tokens and holdout_authors both hold out the tail of train.bin: give one of them")
lr_decay_iters = lr_decay_iters or max_iters
try:
    for w in eval_widths:
        check_width(w, "eval_widths values")
    gptconf = GPTConfig(block_size=block_size, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                        dropout=dropout, bias=bias, n_exp=n_exp, k_exp=k_exp, moe_stride=moe_stride,
                        expert_hidden=expert_hidden, width_multiple=width_multiple, aux_loss_weight=aux_loss_weight,
                        z_loss_weight=z_loss_weight, hr_loss_weight=hr_loss_weight)
    recipe = Recipe.of(config, gptconf, command_line)   # the width and k keys above, checked (dense: one pass)
    if n_exp and any(not 1 <= k <= n_exp for k in eval_k):
        raise ValueError(f"eval_k values must be in [1, n_exp={n_exp}], got {eval_k}")
except ValueError as e:
    fail(str(e))
if n_exp == 0:   # a dense GPT has no dials to evaluate
    eval_widths, eval_k = (1.0,), ()

# DDP: torchrun sets RANK; every rank runs this same script
ddp = int(os.environ.get("RANK", -1)) != -1
device, device_type, dtype, ctx = setup_device(device, dtype)
if ddp:
    # torch.distributed.nn takes the default group as its functions' default argument at import (DDP imports it):
    # imported later it would keep the group past destroy_process_group, and gloo's threads, alive into the
    # interpreter's teardown, can abort the process there ("terminate called ..."). Imported now, it holds None.
    import torch.distributed.nn
    from torch.distributed import barrier, destroy_process_group, init_process_group
    from torch.nn.parallel import DistributedDataParallel as DDP
    init_process_group(backend=("nccl" if device.startswith("cuda") else "gloo") if backend == "auto" else backend)
    ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    sys.excepthook = report_lost_rank(ddp_rank)   # another rank died: one line, not the backend's traceback
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
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data: uint16 memmaps from prepare_data.py, sampled i.i.d. with a generator that every rank seeds alike.
# Each step draws all its micro-batches at once and rank r takes its share, so a run on N processes sees
# exactly the batches of a 1-process run with N times the gradient accumulation. The generator's state is
# the data position: it goes into the checkpoint, and resuming continues the same stream.
split_dir = os.path.join(data_dir, dataset)
try:
    meta = load_meta(split_dir)   # the tokenizer, and for Gutenberg train.bin's authors
    if holdout_authors:   # the last authors of train.bin, by the token counts prepare_data.py recorded
        holdout_tokens, names = held_out_authors(meta, holdout_authors, os.path.join(split_dir, "train.bin"))
        config["holdout_tokens"] = holdout_tokens   # in the checkpoint: sample.py and bench_flops.py hold it out too
        if master_process:
            print(f"holding out the last {holdout_authors} authors of train.bin ({'; '.join(names)}): "
                  f"{holdout_tokens:,} tokens")
except ValueError as e:
    fail(str(e))
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
# model: from scratch, resumed, or upcycled from a dense / plain-MoE checkpoint (checkpoint.upcycle)
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
        require_same(saved.config, gptconf, ARCHITECTURE, "resume keeps the architecture", "the checkpoint")
        model = GPT(gptconf)
        model.load_state_dict(saved.state_dict())
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        train_flops, train_tokens = checkpoint.get("train_flops", 0.0), checkpoint.get("train_tokens", 0)
        log_bytes = checkpoint.get("log_bytes")   # None: a checkpoint from before logs were truncated
    elif init_from.startswith("upcycle:"):   # a few batches find each expert's most important hidden units
        batches = [get_step_batches()[0] for _ in range(4)] if upcycle_reorder else None
        model = upcycle(init_from.split(":", 1)[1], gptconf, meta, split_dir, device, batches)
        print(f"upcycled from {init_from.split(':', 1)[1]}" + (" with hidden units reordered" if batches else ""))
    else:
        raise ValueError(f"init_from must be scratch, resume or upcycle:<dir>, got '{init_from}'")
except (ValueError, FileNotFoundError) as e:
    fail(str(e))
model.to(device)
# The schedule's clock. With max_iters it counts steps. With a training compute (max_train_flops) it counts the
# FLOPs spent in units of one plain-MoE step (full width, training k, one pass): warmup_iters and the cosine
# then cover the same compute whatever a step of this recipe costs, so "a MoE at MoSE's compute" is one flag.
flops_per_moe_step = 3 * model.flops_per_token() * tokens_per_iter   # forward + backward (2x forward)
if max_train_flops:
    max_iters = lr_decay_iters = max_train_flops / flops_per_moe_step


def schedule_clock():
    return train_flops / flops_per_moe_step if max_train_flops else iter_num


def finished():
    # a hair of tolerance: a plain MoE's FLOPs are summed step by step and must end exactly at max_train_flops
    return train_flops >= max_train_flops * (1 - 1e-9) if max_train_flops else iter_num >= max_iters


if master_process:
    print(f"parameters: {model.get_num_params() / 1e6:.2f}M, forward FLOPs/token at full width: "
          f"{model.flops_per_token() / 1e6:.2f}M" + (f"; training compute {max_train_flops:.3e} FLOPs = "
          f"{max_iters:.1f} plain-MoE steps" if max_train_flops else ""))
    if describe(recipe):   # what random_pair really draws: its mix, and p_sequence
        print(describe(recipe))
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
                find_unused_parameters=recipe.detach_router)
# detach_router tests a hypothesis: that the narrower passes' gradients pull the router away from the routing
# the full width needs. With it only the first, widest pass trains the router's weights (the loop switches them)
router_weights = [m.router.w_g.weight for m in raw_model.modules() if isinstance(m, MoSELayer)] \
    if recipe.detach_router else []
route_top_p = route_top_p if recipe.k_sampling == "top_p" else None   # forward's: None, unless k_sampling is top_p


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr; `it` is the schedule clock (schedule_clock: it can be a float)."""
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
dial_name = lambda w, k: f"w={w:g}" + (f",k={k}" if k else "")   # in logs and prints: w=0.5, w=1,k=4


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
            with ctx:
                losses = [raw_model(*to_device(ix, data), width=w if n_exp else None, k_exp=k).loss.item()
                          for ix in batches]
            results[(split, w, k)] = sum(losses) / len(losses)
    raw_model.train()
    return results


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


peak_flops = gpu_peak_flops(device)   # for MFU; None off a GPU this table knows (configurator.py)
trim_heap = heap_trimmer(grow=1.5)   # the C heap: no re-faulting each step, memory bounded (configurator.py)
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
# log.jsonl continues from the checkpoint: a resumed run cuts off what was logged after it (checkpoint.open_log)
log_file = open_log(os.path.join(out_dir, "log.jsonl"), log_bytes) if master_process else None


def log(row):
    if log_file:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()
    if wandb_log and master_process:
        wandb.log(row)


def replay(widths, ks, batches):
    """The step's forward passes once more, each followed by its width (configurator.stop_non_finite's hooks)."""
    for i, width in enumerate(widths):
        for micro_step, (X, Y) in enumerate(batches[i]):
            mb = micro_step * ddp_world_size + ddp_rank
            with ctx:
                raw_model(X, Y, width=width_of(recipe, width, iter_num, mb, X.size(1)) if n_exp else None,
                          k_exp=k_of(recipe, ks, mb), k_pool=recipe.k_pool or None, route_top_p=route_top_p)
            yield width


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
    widths = sample_widths(recipe, width_gen)
    ks = sample_k(recipe, width_gen, gradient_accumulation_steps * ddp_world_size)   # all ranks' micro-batches
    batches = get_step_batches()
    batches = [batches] + [get_step_batches() if recipe.width_data == "fresh" else batches for _ in widths[1:]]
    full_loss = torch.zeros((), device=device)
    step_flops = 0.0   # this rank's training FLOPs in this step
    for micro_step in range(gradient_accumulation_steps):
        mb, teacher = micro_step * ddp_world_size + ddp_rank, None   # mb: the micro-batch's index, all ranks'
        for i, width in enumerate(widths):
            X, Y = batches[i][micro_step]
            for w in router_weights:
                w.requires_grad_(i == 0)   # the trunk still learns through the gates; the router's weights do not
            if ddp:   # sync gradients only on the very last backward of the step (flat, instead of no_sync())
                sync_now = micro_step == gradient_accumulation_steps - 1 and i == len(widths) - 1
                model.require_backward_grad_sync = sync_now
            with ctx:
                out = model(X, Y, width=width_of(recipe, width, iter_num, mb, X.size(1)) if n_exp else None,
                            k_exp=k_of(recipe, ks, mb), k_pool=recipe.k_pool or None, route_top_p=route_top_p)
                loss = out.loss + out.router_loss
                if teacher is not None:   # in-place distillation: learn the widest width's predictions too
                    loss = loss + recipe.distill_weight * distill_loss(out.logits, teacher)
            if i == 0:
                full_loss += out.loss.detach() / gradient_accumulation_steps
                teacher = out.logits.detach().float() if recipe.distill_weight > 0 else None
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
        stop_non_finite(raw_model, replay(widths, ks, batches), iter_num + 1, full_loss.item(),
                        grad_norm.item() if grad_clip else "not computed", widths, ks if ks is not None else k_exp,
                        os.path.join(out_dir, "ckpt.pt"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    trim_heap()
    if ddp:   # every rank must agree on the spent compute: max_train_flops decides when all of them stop
        summed = torch.tensor(step_flops, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        step_flops = summed.item()
    train_flops += step_flops
    step_tokens = tokens_per_iter * (len(widths) if recipe.width_data == "fresh" else 1)   # 'fresh': a batch per width
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
    # the DDP wrapper holds the process group too: freed first, destroy_process_group ends gloo's threads here
    del model
    destroy_process_group()
