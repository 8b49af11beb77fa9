"""
The accuracy-compute curve: validation loss against forward FLOPs per token, for one trained MoSE model at
many operating points (uniform widths, k_exp, width x k, top-p routing, the confidence policy, ttt at FLOPs
budgets, both dials fitted to a budget), next to the baselines' points (a plain MoE over its k_exp, width and
top-p dials, a dense GPT).

    python bench_flops.py --out_dir=out-shakespeare-mose --compare=out-shakespeare-moe,out-shakespeare-dense
    python bench_flops.py ... --series="one MoE per size:out-moe-h192,out-moe-h128,out-moe-h64"
    python bench_flops.py ... --route_top_p=0.5,0.7                 # top-p routing swept, every model with experts
    python bench_flops.py ... --policy=confidence --budget=0.5      # one more point, as sample.py runs it

The dial flags are sample.py's, with sample.py's meaning and checks (dials.check_dial_flags): --width, --k_exp,
--policy, --budget and --gamma add the one operating point of the main model that sample.py would run with them;
--route_top_p is a list here, the masses swept (at full width and at each of --grid_widths).

Every row is measured here: the loss on the validation split (with its standard error over sequences), the
FLOPs the forward actually spent, the tokens per second of the forward. --json=PATH writes the rows,
--plot=PATH.png draws the curves (plot_curve.py, matplotlib, optional; it redraws saved --json rows too).

Out of domain, at every operating point with the same dials: --eval_text=FILE scores any plain text (e.g.
WikiText's wiki.test.raw) in nats per token and bits per character, --lambada=FILE LAMBADA's last-word accuracy
(the word greedily decoded in full) and the word's loss in nats.
"""

import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from configurator import check_ranges, configure, fail, setup_device
from checkpoint import check_tokenizer, load_checkpoint
from dials import allocate_budget, calibration_batches, check_dial_flags, check_route_top_p, make_policy
from model import check_width
from prepare_data import gpt2_encoding

# -----------------------------------------------------------------------------
out_dir = "out-shakespeare-mose"   # the MoSE checkpoint to sweep
compare = ""                       # comma-separated checkpoint dirs of baselines (plain MoE, dense)
series = ""                        # families of baselines, one operating point per model (its full width and
                                   # training k), each family drawn as one line, e.g. one dedicated MoE per size:
                                   # --series="one MoE per size:out-h64,out-h128;a quarter each:out-q64,out-q128"
data_dir = ""                      # '' = from the checkpoint's config
dataset = ""
eval_tokens = 131072               # validation tokens per operating point (non-overlapping windows, spread)
match_tol = 0.01                   # also report the cheapest measured point within this many nats of a baseline's
split = "val"                      # 'val', or 'holdout': the held-out tail of train.bin that the main model was
                                   # trained without (train.py --holdout_tokens), for choosing recipes
batch_size = 32
widths = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
grid_widths = (0.25, 0.5, 0.75)    # width x k_exp combinations
# one more operating point of the main model, sample.py's flags with its meaning; none given, none added
width = ()                         # one value, or one per MoE layer: --width=0.5,1.0 --k_exp=1,2; the row's policy
k_exp = ()                         # is 'per_layer' (none: full width / 0 = the training k)
policy = ""                        # '' = uniform; confidence | ttt | search | allocate | width_top_p (dials.py)
budget = 0.0                       # 0 = none; else a fraction in (0, 1] of the full-width expert FLOPs
gamma = 1.0                        # the confidence policy's sharpness (ttt and search fit their own)
gammas = (0.0, 1.0, 2.0, 4.0, 8.0) # confidence policy, each fitted to every budget in conf_budgets
conf_budgets = (0.75, 0.5, 0.3)    # also the budgets of 'search' (gamma searched) and 'allocate' (per layer)
allocate_k = False                 # the allocator may also lower a layer's k, not only its width
ttt_budgets = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3)
both_budgets = (0.5, 0.4, 0.3)     # both dials at once, 'width_top_p': a uniform width and the top-p routing mass
                                   # that meets each budget, the pair searched on calibration text
ttt_batches = 50                   # the paper: 50 batches of 6 sequences, SGD lr 0.01
ttt_batch_size = 6
ttt_lr = 0.01
ttt_per_layer = False              # one gamma per MoE layer instead of one for the model
route_top_p = ()                   # Matryoshka MoE's top-p routing, for every model with experts: each token takes
                                   # experts by probability until their mass reaches p, e.g. 0.5,0.7,0.9; at full
                                   # width and at each of grid_widths
route_top_p_k = 0                  # ... and at most this many; 0 = each model's own k_max (its k_exp unless it
                                   # trained with k_sampling)
w_min = 0.25
eval_text = ""                     # out of domain: a plain text file (UTF-8), scored at every operating point with
                                   # the checkpoint's tokenizer, e.g. WikiText-2's wiki.test.raw
eval_text_tokens = 0               # ... its first this many tokens, in non-overlapping windows; 0 = all of it
lambada = ""                       # out of domain: LAMBADA's jsonl ({"text": ...} a line), last-word accuracy
lambada_n = 0                      # ... its first N passages only; 0 = all
quick = False                      # a handful of points (CI smoke test)
json_path = ""                     # --json_path=rows.json (also accepted as --json=rows.json)
plot = ""                          # --plot=curve.png
device = "auto"
dtype = "auto"
seed = 1337
config = configure(globals(), aliases={"json": "json_path"})
# -----------------------------------------------------------------------------
check_ranges(config, {   # every number in its range before any work (widths and budgets are checked below)
    **{k: (lambda v: v >= 1, ">= 1") for k in ("batch_size", "ttt_batches", "ttt_batch_size")},
    **{k: (lambda v: v >= 0, ">= 0") for k in ("eval_tokens", "match_tol", "route_top_p_k", "gammas")},
    "ttt_lr": (lambda v: v > 0, "> 0"),
})

if plot:   # check for the optional package now, not after a sweep of many minutes
    try:
        import matplotlib
    except ImportError:
        fail("--plot needs matplotlib: pip install matplotlib")
if quick:
    widths, grid_widths, gammas, conf_budgets, ttt_budgets, ttt_batches = (1.0, 0.5), (0.5,), (2.0,), (0.5,), (0.5,), 5
    both_budgets = (0.5,)
try:
    for w in (*widths, *grid_widths, w_min):
        check_width(w)
    for b in (*conf_budgets, *ttt_budgets):
        if not w_min <= b <= 1:
            raise ValueError(f"budgets must be in [w_min={w_min}, 1] (fractions of full-width expert FLOPs), got {b}")
    for b in both_budgets:
        if not 0 < b <= 1:
            raise ValueError(f"both_budgets must be in (0, 1] (fractions of full-width expert FLOPs), got {b}")
    for p in route_top_p:
        check_route_top_p(p)
    if width or k_exp or policy or budget:   # the one operating point, checked as sample.py checks it
        point_width = check_dial_flags(width or (1.0,), k_exp or (0,), policy or "uniform", budget, gamma, w_min)
    for key, value in (("eval_text_tokens", eval_text_tokens), ("lambada_n", lambada_n)):
        if value < 0:
            raise ValueError(f"--{key} must be >= 0 (0 = all), got {value}")
except ValueError as e:
    fail(str(e))
device, device_type, dtype, ctx = setup_device(device, dtype)
torch.manual_seed(seed)

# the models: the MoSE checkpoint first, then the baselines, then the members of each series; a model is
# named by its dir's last part
name_of = lambda d: os.path.basename(os.path.normpath(d))
member_of = {}   # model name -> the series it belongs to
families = []
for part in [p for p in series.split(";") if p.strip()]:
    label, sep, dirs = part.rpartition(":")   # a label may hold commas; no dir may hold ':' or ';'
    label, dirs = label.strip(), [d.strip() for d in dirs.split(",") if d.strip()]
    if not sep or not label or not dirs:
        fail(f"--series takes 'label:dir,dir;label:dir,...', got '{part}'")
    if label in [l for l, _ in families]:
        fail(f"--series has two series labelled '{label}': give each its own label")
    families.append((label, dirs))
for label, dirs in families:
    for d in dirs:
        name = name_of(d)
        if member_of.get(name, label) != label:
            fail(f"{d} is in two series ('{member_of[name]}', '{label}'): a model is one point of one series")
        member_of[name] = label
models, paths = {}, {}
swept = [out_dir] + [c for c in compare.split(",") if c]   # every dial of these; a series member alone: one point
for d in swept + [d for _, dirs in families for d in dirs]:
    name = name_of(d)
    if name in paths:   # a model may be in --compare and in a series (the full-size MoE among the sizes)
        if os.path.realpath(paths[name]) != os.path.realpath(d):
            fail(f"two checkpoint dirs are named {name} ({paths[name]}, {d}): give each model a dir of its own name")
        continue
    try:
        model, ckpt = load_checkpoint(os.path.join(d, "ckpt.pt"), device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    models[name], paths[name] = (model.eval(), ckpt), d
one_point = set(member_of) - {name_of(d) for d in swept}
main_name = next(iter(models))
main_model, main_ckpt = models[main_name]
data_dir = data_dir or main_ckpt["config"]["data_dir"]
dataset = dataset or main_ckpt["config"]["dataset"]
T = main_model.config.block_size
for name, (m, _) in models.items():
    if m.config.block_size != T:
        fail(f"{name} has block_size {m.config.block_size}, {main_name} {T}: compare models of one context length")
    if route_top_p and m.config.n_exp and route_top_p_k > m.config.n_exp:
        fail(f"--route_top_p_k={route_top_p_k} is more experts than {name} has (n_exp={m.config.n_exp})")
# the one operating point (--width, --k_exp, --policy, --budget): the main model's per-layer counts checked now
point_k = None
if width or k_exp or policy or budget:
    for key, values in (("width", width), ("k_exp", k_exp)):
        if len(values) > 1 and len(values) != main_model.config.n_moe_layers:
            fail(f"--{key} has {len(values)} values but {main_name} has {main_model.config.n_moe_layers} MoE layers: "
                 f"give one value, or one per MoE layer")
    point_k = [k or main_model.config.k_exp for k in k_exp or (0,)]   # 0 = the training value
    point_k = point_k[0] if len(point_k) == 1 else point_k
    try:   # the model's own checks (k in [1, n_exp]; a dense model has no dials)
        main_model.resolve_dials(point_width if not policy or policy == "uniform" else None, point_k)
    except ValueError as e:
        fail(str(e))


def load_split(split):
    path = os.path.join(data_dir, dataset, f"{split}.bin")
    if not os.path.exists(path):
        fail(f"no {path}: run `python prepare_data.py {dataset}` or pass --data_dir")
    return np.memmap(path, dtype=np.uint16, mode="r")


# validation: non-overlapping windows from the start of the split, the same for every row (so differences
# between rows are paired); on Tiny Shakespeare the default covers the whole split
if split not in ("val", "holdout"):
    fail(f"split must be val or holdout, got '{split}'")
holdout_tokens = main_ckpt["config"].get("holdout_tokens", 0)
if split == "holdout":
    for name, (_, ckpt) in models.items():
        if ckpt["config"].get("holdout_tokens", 0) != holdout_tokens or not holdout_tokens:
            fail(f"--split=holdout needs every model trained with the same --holdout_tokens (> 0); {name} has "
                 f"{ckpt['config'].get('holdout_tokens', 0)}, {main_name} {holdout_tokens}")
val = load_split("val")
if split == "holdout":   # from here on 'val' is the text the rows are scored on
    val = load_split("train")[-holdout_tokens:]
for name, (_, ckpt) in models.items():   # every model is scored on this text: its ids must mean the same
    try:
        check_tokenizer(ckpt.get("meta") or {"tokenizer": "gpt2"}, os.path.join(data_dir, dataset))
    except ValueError as e:
        fail(f"{name}: {e}")
n_windows = min(eval_tokens // T, (len(val) - 1) // T)
if n_windows < 2:   # a standard error needs at least two windows
    fail(f"{dataset}'s val.bin has {len(val)} tokens, fewer than two windows of block_size {T} + 1: "
         f"use more text" + (f" or a larger --eval_tokens (now {eval_tokens})" if eval_tokens // T < 2 else ""))


def window_batches(ids, starts):
    """The windows of T tokens of ids at starts and their next tokens, in batches of batch_size on the device:
    [(x, y)], the same for every row (validation and --eval_text)."""
    batches = []
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        x = torch.from_numpy(np.stack([ids[j:j + T] for j in s]).astype(np.int64)).to(device)
        y = torch.from_numpy(np.stack([ids[j + 1:j + 1 + T] for j in s]).astype(np.int64)).to(device)
        batches.append((x, y))
    return batches


# every (n / n_windows)-th of the split's n non-overlapping windows: spread over all of it, since a split of many
# books (Gutenberg's held-out authors) would otherwise be scored on its first book alone; all of them when they fit
val_batches = window_batches(val, np.arange(n_windows) * ((len(val) - 1) // T // n_windows) * T)
# calibration text for fitting policies comes from the train split, less the held-out tail: never fit on what
# is reported (the same helper as sample.py's)
try:
    calib_batches = calibration_batches(os.path.join(data_dir, dataset), T, ttt_batches, ttt_batch_size, seed,
                                        device, main_model.config.vocab_size, holdout_tokens)
except ValueError as e:
    fail(str(e))

# Out-of-domain text, scored at every operating point through the same forward as validation. Every model reads
# the main model's tokenizer (checked above), so each text is encoded once. A char model maps a character its
# vocabulary lacks to its replacement symbol (meta's 'unk': prepare_data.py's gutenberg_char has one) or refuses.
text_batches, text_chars, lambada_batches = [], 0, []
if eval_text or lambada:
    meta = main_ckpt.get("meta") or {"tokenizer": "gpt2"}

    def read_text(path, flag):
        """A UTF-8 file's text, line endings made \\n (as prepare_data.py makes them); a bad file is one line."""
        if not os.path.isfile(path):
            fail(f"--{flag}={path}: no such file")
        try:
            with open(path, encoding="utf-8") as f:   # universal newlines: \r\n and \r are read as \n
                text = f.read()
        except UnicodeDecodeError as e:
            fail(f"--{flag}={path} is not UTF-8 text ({e.reason} at byte {e.start})")
        if not text.strip():
            fail(f"--{flag}={path} is empty")
        return text

    if meta["tokenizer"] == "char":
        stoi, unk = meta["stoi"], meta.get("unk")
        chars_per_token = np.ones(main_model.config.vocab_size, np.int64)

        def encode(text, what):
            unknown = sorted(set(text) - set(stoi))
            if unknown and unk is None:
                fail(f"{what} has {len(unknown)} characters outside this char model's vocabulary, e.g. "
                     f"{', '.join(map(repr, unknown[:8]))}, and the model has no replacement symbol for them "
                     f"(meta.pkl's 'unk', as prepare_data.py gutenberg_char writes it)")
            return [stoi[c] if c in stoi else stoi[unk] for c in text]
    else:
        enc = gpt2_encoding(fail)   # offline, tiktoken needs its cached files (TIKTOKEN_CACHE_DIR)
        # bits per character need the characters each token holds: the characters whose first UTF-8 byte is in it,
        # so over a run of tokens the count is exact even where a token splits a character
        chars_per_token = np.zeros(main_model.config.vocab_size, np.int64)
        chars_per_token[:enc.n_vocab] = [sum(b & 0xC0 != 0x80 for b in enc.decode_single_token_bytes(t))
                                         for t in range(enc.n_vocab)]
        encode = lambda text, what: enc.encode_ordinary(text)

if eval_text:   # non-overlapping windows from the start of the text, like validation's, the same for every row
    text = read_text(eval_text, "eval_text")
    ids = np.array(encode(text, f"--eval_text={eval_text}"), dtype=np.int64)
    n_text = (len(ids) - 1) // T if not eval_text_tokens else min((len(ids) - 1) // T, eval_text_tokens // T)
    if n_text < 2:   # a standard error needs two windows
        fail(f"--eval_text={eval_text} gives {len(ids):,} tokens: fewer than two windows of block_size {T} + 1" +
             (f" within --eval_text_tokens={eval_text_tokens}" if eval_text_tokens else "") + ": use more text")
    text_batches = window_batches(ids, np.arange(n_text) * T)
    text_chars = int(chars_per_token[ids[1:n_text * T + 1]].sum())   # the characters of the scored targets
    unknown = sum(c not in stoi for c in text) if meta["tokenizer"] == "char" else 0
    print(f"--eval_text={eval_text}: {len(text):,} characters, {len(ids):,} tokens" +
          (f" ({unknown:,} characters outside the vocabulary read as {unk!r})" if unknown else "") +
          f"; scoring {n_text} windows of {T} ({n_text * T:,} tokens, {text_chars:,} characters). Nats per token "
          f"depend on the tokenizer: compare char and BPE models in bits per character only")
if lambada:   # each passage: its context, then its last word with the space before it, to decode greedily
    passages = []
    # lines split at \n only: a JSON string may hold a raw U+2028, where splitlines() would break it
    for number, line in enumerate(read_text(lambada, "lambada").split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = None
        passage = item.get("text").rstrip() if isinstance(item, dict) and isinstance(item.get("text"), str) else ""
        cut = passage.rfind(" ")   # the word is what follows the last space (as evaluation harnesses split it)
        if cut <= 0:
            fail(f"--lambada={lambada}, line {number}: not a JSON object whose \"text\" holds a passage and its last "
                 f"word: give LAMBADA's jsonl, one {{\"text\": ...}} a line")
        passages.append((passage[:cut], passage[cut:]))
        if len(passages) == lambada_n:
            break
    items = [(encode(c, f"--lambada={lambada}"), encode(w, f"--lambada={lambada}")) for c, w in passages]
    if max(len(w) for _, w in items) > T:
        fail(f"--lambada={lambada} has a last word of {max(len(w) for _, w in items)} tokens: more than block_size {T}")
    for i in range(0, len(items), batch_size):
        xs, ys = [], []
        for context, word in items[i:i + batch_size]:
            # the context's last T - len(word) + 1 tokens, so that the word decoded after it fits one window: then
            # greedy decoding token by token is the argmax at each of the word's positions of this one forward
            seq = context[-(T - len(word) + 1):] + word
            xs.append(seq[:-1])
            ys.append([-1] * (len(seq) - 1 - len(word)) + word)   # -1: not scored
        n = max(map(len, xs))   # padded on the right, which a causal model's earlier positions never see
        lambada_batches.append((torch.tensor([x + [0] * (n - len(x)) for x in xs], device=device),
                                torch.tensor([y + [-1] * (n - len(y)) for y in ys], device=device)))
    print(f"--lambada={lambada}: {len(items)} passages; one scores if greedy decoding after its context gives its "
          f"last word (with the space before it) in full, token by token; the word's loss is in nats per word "
          f"(over its tokens, summed: comparable across tokenizers)")
print(f"evaluating on {n_windows * T:,} {'validation' if split == 'val' else 'held-out training'} tokens of "
      f"{dataset} ({n_windows} windows of {T}), device {device}, dtype {dtype}")
# what each model cost to train (train.py counts it; older checkpoints lack it): compare at equal compute
train_flops = {name: ckpt.get("train_flops") for name, (_, ckpt) in models.items()}
for name, (_, ckpt) in models.items():
    f = train_flops[name]
    print(f"  {name}: trained {ckpt['iter_num']} steps" + (f", {ckpt['train_tokens']:,} tokens, {f:.4e} FLOPs"
          + (f" ({f / train_flops[main_name]:.3f} of {main_name}'s)" if train_flops[main_name] else "") if f else
          ", training FLOPs not recorded (an older checkpoint)"))


def forward(model, x, y, width, k_exp, route_top_p):
    """One operating point's forward: every score of a row (validation, --eval_text, --lambada) goes through
    here, so all of them see the same dials."""
    with ctx:
        return model(x, y, width=width, k_exp=k_exp, route_top_p=route_top_p)


@torch.no_grad()
def evaluate(model, width, k_exp, route_top_p=None):
    """Mean validation loss, its standard error over the windows, spent FLOPs/token, experts/token, forward
    tokens/s."""
    seq_losses, expert_flops, experts, seconds = [], [], [], 0.0
    forward(model, *val_batches[0], width, k_exp, route_top_p)   # warm-up, untimed: first calls allocate
    for x, y in val_batches:
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        out = forward(model, x, y, width, k_exp, route_top_p)
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds += time.time() - t0
        ce = F.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none")   # (B, T)
        seq_losses.append(ce.mean(dim=1).cpu())
        expert_flops.append(out.stats["expert_flops"].item() * x.size(0))
        per_layer = out.stats["experts_per_token"]   # used experts per token, one value per MoE layer
        experts.append(sum(per_layer) / len(per_layer) * x.size(0) if per_layer else 0.0)
    seq_losses = torch.cat(seq_losses).double()
    expert = sum(expert_flops) / len(seq_losses)
    total = model.flops_breakdown(1.0, k_exp)["non_expert"] + expert
    stderr = seq_losses.std() / math.sqrt(len(seq_losses))
    return dict(val_loss=seq_losses.mean().item(), val_loss_stderr=stderr.item(),
                flops_per_token=total, expert_flops_per_token=expert,
                experts_per_token=sum(experts) / len(seq_losses) if model.config.n_exp else None,
                tokens_per_s=len(seq_losses) * T / seconds), seq_losses


@torch.no_grad()
def evaluate_ood(model, width, k_exp, route_top_p):
    """--eval_text and --lambada at one operating point: the row's fields, and per window / passage what the
    paired differences need."""
    fields, items = {}, {}
    if text_batches:
        nats = torch.cat([F.cross_entropy(forward(model, x, y, width, k_exp, route_top_p).logits.float()
                                          .transpose(1, 2), y, reduction="none").sum(dim=1).cpu()
                          for x, y in text_batches]).double()
        per_token = nats / T   # each window's mean
        fields.update(eval_text=eval_text, eval_text_nats_per_token=per_token.mean().item(),
                      eval_text_nats_stderr=(per_token.std() / math.sqrt(len(nats))).item(),
                      eval_text_bits_per_char=nats.sum().item() / math.log(2) / text_chars)
        items["eval_text"] = per_token
    if lambada_batches:
        correct, nats = [], []
        for x, y in lambada_batches:
            logits = forward(model, x, y, width, k_exp, route_top_p).logits.float()
            word = y >= 0
            correct.append(((logits.argmax(dim=-1) == y) | ~word).all(dim=1).cpu())   # every token of the word
            nats.append(F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="none").sum(dim=1).cpu())
        correct, nats = torch.cat(correct).double(), torch.cat(nats).double()
        fields.update(lambada=lambada, lambada_passages=len(correct), lambada_acc=correct.mean().item(),
                      lambada_acc_stderr=(correct.std() / math.sqrt(len(correct))).item(),
                      lambada_nats_per_word=nats.mean().item())
        items["lambada_acc"], items["lambada_nats"] = correct, nats
    return fields, items


reference = main_model.flops_breakdown()   # the MoE at full width and its training k: rel = 1
rows, seq_losses, ood_items = [], {}, {}


def trained_k(model):
    return model.config.k_exp if model.config.n_exp else None


def as_trained(name):
    """The index of the row of model `name` at full width and its training k (None if it has none)."""
    return next((i for i, r in enumerate(rows) if r["model"] == name and r["policy"] in ("uniform", "dense")
                 and r["width"] == 1.0 and r["k_exp"] == trained_k(models[name][0])), None)


def add_row(name, policy, width, k_exp, gamma=None, budget=None, route_top_p=None):
    model = models[name][0]
    k = k_exp or trained_k(model)
    result, per_seq = evaluate(model, width if model.config.n_exp else None, k, route_top_p)
    ood, per_item = evaluate_ood(model, width if model.config.n_exp else None, k, route_top_p)
    row = dict(model=name, series=member_of.get(name), policy=policy,
               width=width if isinstance(width, (float, list)) else getattr(width, "Gamma", None),
               k_exp=k, gamma=gamma, budget=budget, route_top_p=route_top_p, train_flops=train_flops[name], **result,
               rel_flops=result["flops_per_token"] / reference["total"],
               rel_expert_flops=(result["expert_flops_per_token"] / reference["experts"]
                                 if reference["experts"] else None),
               **ood)
    rows.append(row)
    seq_losses[len(rows) - 1] = per_seq
    ood_items[len(rows) - 1] = per_item
    print(format_row(row), flush=True)


def policy_name(r):
    return f"top_p {r['route_top_p']:g}" if r["policy"] == "top_p" else r["policy"]


def format_row(r):
    fmt = lambda v, f: ("-" if v is None else f.format(v) if not isinstance(v, list)
                        else "/".join(f"{x:.2f}" for x in v))
    return (f"{r['model'][:24]:<24} {policy_name(r):<11} {fmt(r['width'], '{:.3f}'):>6} {fmt(r['k_exp'], '{:d}'):>3} "
            f"{fmt(r['gamma'], '{:.2f}'):>6} {fmt(r['budget'], '{:.2f}'):>6} {r['flops_per_token'] / 1e6:9.3f} "
            f"{r['rel_flops']:6.3f} {r['expert_flops_per_token'] / 1e6:9.3f} {fmt(r['rel_expert_flops'], '{:.3f}'):>6} "
            f"{r['val_loss']:7.4f} ±{r['val_loss_stderr']:.4f} {math.exp(r['val_loss']):7.3f} "
            f"{r['tokens_per_s']:9,.0f}"
            + (f" {r['eval_text_nats_per_token']:9.4f} {r['eval_text_bits_per_char']:6.3f}" if eval_text else "")
            + (f" {r['lambada_acc']:8.3f} {r['lambada_nats_per_word']:8.3f}" if lambada else ""))


def fit_policy(policy, k_exp=None, **kw):
    """A policy fitted to a budget on the calibration text, or None (and a note) when the budget is out of its
    reach, e.g. a high budget at a large gamma: the sweep goes on without that point."""
    try:
        return make_policy(main_model, policy, k_exp=k_exp or main_model.config.k_exp, batches=calib_batches,
                           w_min=w_min, **kw)
    except ValueError as e:
        print(f"  (skipped {policy} {kw}: {e})")
        return None


def add_point(name):
    """The one operating point of --width, --k_exp, --policy, --budget and --gamma: the dial sample.py runs with
    the same flags (make_policy), fitted on the same calibration text."""
    if policy in ("", "uniform"):   # by hand: one width (or the budget) and one k per MoE layer
        return add_row(name, "per_layer", *main_model.resolve_dials(budget or point_width, point_k))
    dial = fit_policy(policy, point_k, width=point_width, budget=budget or None, gamma=gamma, ttt_lr=ttt_lr,
                      per_layer=ttt_per_layer)
    if dial is None:
        return
    if policy == "width_top_p":   # (width, route_top_p)
        return add_row(name, policy, dial[0], point_k, None, budget, route_top_p=dial[1])
    if policy == "allocate":      # a width per MoE layer
        return add_row(name, policy, dial, point_k, None, budget)
    g = dial.gamma.tolist() if isinstance(dial.gamma, torch.Tensor) else dial.gamma
    add_row(name, policy, dial, point_k, g, budget or None)


print(f"{'model':<24} {'policy':<11} {'width':>6} {'k':>3} {'gamma':>6} {'budget':>6} {'MFLOP/tok':>9} {'rel':>6} "
      f"{'expMFLOP':>9} {'rel':>6} {'val loss':>7} {'± se':>7} {'ppl':>7} {'tok/s':>9}"
      + (f" {'text nats':>9} {'bits/c':>6}" if eval_text else "")
      + (f" {'LAMB acc':>8} {'nats/wd':>8}" if lambada else ""))
for name, (model, ckpt) in models.items():
    n_exp, k_train = model.config.n_exp, model.config.k_exp
    if n_exp == 0:
        add_row(name, "dense", 1.0, None)
        continue
    if name in one_point:   # a series member is one operating point: the model as it was trained
        add_row(name, "uniform", 1.0, k_train)
        continue
    for w in sorted(widths, reverse=True):                     # uniform width at the training k
        add_row(name, "uniform", float(w), k_train)
    for k in range(1, (2 if quick else n_exp) + 1):            # elastic top-k at full width
        if k != k_train:
            add_row(name, "uniform", 1.0, k)
    for w in grid_widths:                                      # width x k
        for k in range(1, min(n_exp, 2 * k_train) + 1):
            if k != k_train:
                add_row(name, "uniform", float(w), k)
    sampled_k = ckpt["config"].get("k_sampling", "none") != "none"
    k_most = min(route_top_p_k or (sampled_k and ckpt["config"].get("k_max")) or k_train, n_exp)
    for w in (1.0, *grid_widths):                              # top-p routing, at most k_most experts, x width
        for p in route_top_p:
            add_row(name, "top_p", float(w), k_most, route_top_p=float(p))
    if name != main_name:   # the policies are MoSE's: baselines get the dials they have
        continue
    if point_k is not None:                                    # --width, --k_exp, --policy, --budget, --gamma
        add_point(name)
    # the sweeps' budgets are b, their fitted dials `fitted`: the names budget and policy are the flags above
    for b in conf_budgets:
        for g in gammas:
            fitted = fit_policy("confidence", budget=b, gamma=g)
            if fitted is not None:
                add_row(name, "confidence", fitted, k_train, g, b)
    for b in ttt_budgets:
        t0 = time.time()
        fitted = fit_policy("ttt", budget=b, ttt_lr=ttt_lr, per_layer=ttt_per_layer)
        if fitted is None:
            continue
        g = fitted.gamma.tolist() if isinstance(fitted.gamma, torch.Tensor) else fitted.gamma
        add_row(name, "ttt", fitted, k_train, g, b)
        print(f"  (ttt fitted in {time.time() - t0:.1f}s on {len(calib_batches)} train batches)")
    for b in conf_budgets:   # gamma searched, and a width (and k) per layer allocated, on calibration text
        fitted = fit_policy("search", budget=b)
        if fitted is not None:
            add_row(name, "search", fitted, k_train, fitted.gamma, b)
        try:
            layer_widths, layer_ks = allocate_budget(main_model, calib_batches, b, k_train, w_min,
                                                     k_choices=range(1, k_train) if allocate_k else ())
            add_row(name, "allocate", layer_widths, layer_ks, None, b)
        except ValueError as e:
            print(f"  (skipped allocate at budget {b}: {e})")
    for b in both_budgets:   # both dials: a uniform width with the route_top_p that meets the budget
        fitted = fit_policy("width_top_p", budget=b)   # (width, route_top_p)
        if fitted is not None:
            add_row(name, "width_top_p", fitted[0], k_train, None, b, route_top_p=fitted[1])


# -----------------------------------------------------------------------------
# the Pareto frontier and the savings at matched loss


def frontier(rs):
    """Rows not dominated: no other row has fewer or equal FLOPs and a lower loss."""
    rs = sorted(rs, key=lambda r: (r["flops_per_token"], r["val_loss"]))
    out, best = [], float("inf")
    for r in rs:
        if r["val_loss"] < best:
            out.append(r)
            best = r["val_loss"]
    return out


def paired_difference(i, j):
    """Row i's loss minus row j's, '+d ± se': per-window differences over the same windows cancel most of the
    noise that the windows share, so this is far more precise than either row's own standard error."""
    diff = seq_losses[i] - seq_losses[j]
    return f"{diff.mean():+.4f} ± {diff.std() / math.sqrt(len(diff)):.4f}"


def saving(cost, base):
    """'saves 12.3 %' of base, or 'costs 5.0 % more' where cost exceeds it."""
    return f"saves {1 - cost / base:.1%}" if cost <= base else f"costs {cost / base - 1:.1%} more"


def flops_to_reach(front, loss, key):
    """The fewest FLOPs (key) on a frontier that reach a loss <= `loss`, interpolating linearly between
    neighbouring frontier points (an operating point between them can be had by mixing the two)."""
    for a, b in zip([None] + front, front):
        if b["val_loss"] <= loss:
            if a is None or a["val_loss"] == b["val_loss"]:
                return b[key]
            t = (a["val_loss"] - loss) / (a["val_loss"] - b["val_loss"])
            return a[key] + t * (b[key] - a[key])
    return None


print("\nPareto frontier (all models):")
for r in frontier(rows):
    print("  " + format_row(r))
main_front = frontier([r for r in rows if r["model"] == main_name])
mine = as_trained(main_name)   # the main model at full width and its training k
for name, (model, _) in models.items():
    if name == main_name:
        continue
    base = [r for r in rows if r["model"] == name]
    print(f"\n{main_name} vs {name}: FLOPs {main_name} needs to match each of {name}'s frontier points")
    for r in frontier(base):
        need = flops_to_reach(main_front, r["val_loss"], "flops_per_token")
        need_e = flops_to_reach(main_front, r["val_loss"], "expert_flops_per_token")
        point = f"  {policy_name(r)} w={r['width']:g} k={r['k_exp'] or '-'}: loss {r['val_loss']:.4f} at " \
                f"{r['flops_per_token'] / 1e6:.3f} MFLOPs/token"
        if need is None:
            print(f"{point}; {main_name} never reaches this loss")
            continue
        saved_e = f", {saving(need_e, r['expert_flops_per_token'])} of expert FLOPs" if r["expert_flops_per_token"] \
            else ""
        print(f"{point}; {main_name} reaches it with {need / 1e6:.3f}: {saving(need, r['flops_per_token'])} "
              f"of total FLOPs{saved_e}")
    for r in frontier(base):   # no interpolation: the cheapest operating point actually measured within match_tol
        near = [m for m in main_front if m["val_loss"] <= r["val_loss"] + match_tol]
        if near and r["expert_flops_per_token"]:
            m = min(near, key=lambda m: m["expert_flops_per_token"])
            w = "/".join(f"{x:g}" for x in m["width"]) if isinstance(m["width"], list) else \
                "-" if m["width"] is None else f"{m['width']:.3g}"
            print(f"  within {match_tol:g} of {policy_name(r)} w={r['width']:g} k={r['k_exp']} ({r['val_loss']:.4f}): "
                  f"{main_name}'s {policy_name(m)} w={w} k={m['k_exp']} at {m['val_loss']:.4f} "
                  f"{saving(m['expert_flops_per_token'], r['expert_flops_per_token'])} of expert FLOPs, "
                  f"{saving(m['flops_per_token'], r['flops_per_token'])} of total FLOPs")
    ref = as_trained(name)
    print(f"  at full width: {main_name} - {name} = {paired_difference(mine, ref)} "
          f"nats (paired over the same {len(seq_losses[mine])} validation windows)")
    for key, what in (("eval_text", f"nats/token on {eval_text}, over the same windows"),
                      ("lambada_acc", "LAMBADA accuracy"),
                      ("lambada_nats", "LAMBADA nats/word, over the same passages")):
        if key in ood_items[mine]:   # out of domain, paired in the same way
            diff = ood_items[mine][key] - ood_items[ref][key]
            print(f"  at full width, {what}: {main_name} - {name} = {diff.mean():+.4f} ± "
                  f"{diff.std() / math.sqrt(len(diff)):.4f}")
    # a smaller baseline (e.g. a dedicated MoE with narrower experts): the main model's uniform width that spends
    # the same forward FLOPs per token, paired
    same = next((i for i, r in enumerate(rows) if r["model"] == main_name and r["policy"] == "uniform"
                 and r["k_exp"] == rows[ref]["k_exp"] and abs(r["flops_per_token"] / rows[ref]["flops_per_token"] - 1)
                 < 1e-3), None) if ref is not None and rows[ref]["policy"] == "uniform" else None
    if same is not None and same != mine:
        print(f"  at its FLOPs ({rows[ref]['flops_per_token'] / 1e6:.3f} MFLOPs/token): {main_name} w="
              f"{rows[same]['width']:g} - {name} = {paired_difference(same, ref)} nats")

# do per-token widths beat one width for all at the same budget?
uniform_at = {r["width"]: i for i, r in enumerate(rows) if r["model"] == main_name and r["policy"] == "uniform"
              and r["k_exp"] == main_model.config.k_exp}
pairs = [(i, uniform_at[r["budget"]]) for i, r in enumerate(rows)
         if r["model"] == main_name and r["policy"] in ("confidence", "ttt", "search", "allocate", "width_top_p")
         and r["budget"] in uniform_at]
if pairs:
    print(f"\n{main_name}: width policies against uniform width = budget (paired over the same windows)")


def setting(r):
    """A policy row's own setting: its gamma, (allocate) its width and k per MoE layer, (width_top_p) both dials."""
    if r["policy"] == "width_top_p":
        return f"w {r['width']:g} " + ("all k" if r["route_top_p"] is None else f"p {r['route_top_p']:.3g}")
    if r["policy"] == "allocate":
        return f"widths {'/'.join(f'{w:g}' for w in r['width'])} k {'/'.join(map(str, r['k_exp']))}"
    gamma = r["gamma"]
    return "gamma " + ("/".join(f"{g:.2f}" for g in gamma) if isinstance(gamma, list) else f"{gamma:.2f}")


for i, j in pairs:
    r = rows[i]
    print(f"  {r['policy']:<11} {setting(r):>14}, budget {r['budget']:.2f} (spent {r['rel_expert_flops']:.3f}): "
          f"{r['val_loss']:.4f} - {rows[j]['val_loss']:.4f} = {paired_difference(i, j)}")
# both dials against the paper's per-token widths at the same budget (the confidence policy at the gamma swept
# nearest to 1, the paper's default)
confidence_at = {}
for i, r in enumerate(rows):
    if r["model"] == main_name and r["policy"] == "confidence":
        j = confidence_at.get(r["budget"])
        if j is None or abs(r["gamma"] - 1) < abs(rows[j]["gamma"] - 1):
            confidence_at[r["budget"]] = i
both = [(i, confidence_at.get(r["budget"])) for i, r in enumerate(rows)
        if r["model"] == main_name and r["policy"] == "width_top_p"]
if both:
    print(f"\n{main_name}: both dials (width x top-p) against the confidence policy at the same budget, gamma "
          f"nearest 1 (paired)")
for i, j in both:
    if j is None:
        print(f"  budget {rows[i]['budget']:.2f}: no confidence row at this budget (add it to --conf_budgets)")
        continue
    print(f"  budget {rows[i]['budget']:.2f}: {setting(rows[i])} (spent {rows[i]['rel_expert_flops']:.3f}) "
          f"{rows[i]['val_loss']:.4f} - confidence {setting(rows[j])} (spent {rows[j]['rel_expert_flops']:.3f}) "
          f"{rows[j]['val_loss']:.4f} = {paired_difference(i, j)}")
# gamma three ways: searched on calibration text, learned by ttt, and the grid's best chosen on the reported text
# itself (an optimistic reference: no fitted method can expect to beat it)
sides = []
for b in conf_budgets:   # b, not budget: that name is the flag above
    at = {p: [i for i, r in enumerate(rows) if r["model"] == main_name and r["policy"] == p and r["budget"] == b]
          for p in ("search", "ttt", "confidence")}
    if at["search"] and at["confidence"]:
        sides.append((b, at["search"][0], at["ttt"][0] if at["ttt"] else None,
                      min(at["confidence"], key=lambda i: rows[i]["val_loss"])))
if sides:
    print(f"\n{main_name}: gamma searched on calibration text, learned by ttt, and the best of the grid {gammas} "
          f"(chosen on the reported text)")
for b, s, t, g in sides:
    ttt_cell = f"ttt {setting(rows[t])} {rows[t]['val_loss']:.4f}" if t is not None else "ttt -"
    print(f"  budget {b:.2f}: search {setting(rows[s])} {rows[s]['val_loss']:.4f} | {ttt_cell} | best of grid "
          f"{setting(rows[g])} {rows[g]['val_loss']:.4f}; search - best of grid = {paired_difference(s, g)}")

if json_path:
    keys = ("model", "series", "train_flops", "policy", "width", "k_exp", "gamma", "budget", "route_top_p",
            "flops_per_token", "expert_flops_per_token", "experts_per_token", "rel_flops", "rel_expert_flops",
            "val_loss", "val_loss_stderr", "tokens_per_s") \
        + (("eval_text", "eval_text_nats_per_token", "eval_text_nats_stderr", "eval_text_bits_per_char") if eval_text
           else ()) + (("lambada", "lambada_passages", "lambada_acc", "lambada_acc_stderr", "lambada_nats_per_word")
                       if lambada else ())
    with open(json_path, "w") as f:
        json.dump([{k: r[k] for k in keys} for r in rows], f, indent=1)
    print(f"wrote {len(rows)} rows to {json_path}")
if plot:   # matplotlib was checked at start-up, so a missing package never costs a finished sweep
    import plot_curve
    plot_curve.draw([{k: r[k] for k in ("model", "series", "policy", "width", "k_exp", "gamma", "route_top_p",
                                        "rel_expert_flops", "val_loss")} for r in rows], plot)
    print(f"wrote {plot}")
