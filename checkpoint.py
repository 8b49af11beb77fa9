"""
Checkpoints and tokenizers, shared by train.py, sample.py and bench_flops.py: a checkpoint is written
atomically (a crash never leaves a half-written file in place of the last good one) and read back with one
clear line when it is missing, truncated or not ours; the tokenizer travels inside it (meta.pkl's contents).

load_meta reads a dataset's meta.pkl (the tokenizer; for Gutenberg also train.bin's authors, which
held_out_authors turns into train.py's held-out tail), and open_log continues log.jsonl from a checkpoint.

Upcycling lives here too (train.py --init_from=upcycle:DIR): it is one more way to read a checkpoint into a
model, a trained dense or MoE one into the configured MoSE, and it needs load_checkpoint, check_tokenizer and
require_same, all of this file; train.py only chooses it.
"""

import os
import pickle

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, MoSELayer

# the GPTConfig keys a model's weights fix: a resumed run must keep them
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "n_exp", "k_exp", "moe_stride",
                "expert_hidden", "width_multiple")


def save_checkpoint(checkpoint, path):
    """Write to a temporary file, then rename: a crash mid-write leaves the previous checkpoint intact.
    The fsyncs make it hold after a power cut too: without them the rename can reach the disk before the
    data, leaving an empty ckpt.pt in place of both the old and the new one."""
    tmp = f"{path}.tmp"
    try:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)   # atomic on POSIX and Windows
        if os.name == "posix":  # the rename itself lives in the directory
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu"):
    """Returns (model, checkpoint dict). Raises FileNotFoundError / ValueError with a one-line message."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py ...) or fix --out_dir")
    unusable = lambda e: ValueError(f"{path} is not a usable checkpoint ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:120]}); it may be truncated or from another version: "
                                    f"delete it and train again")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)   # optimizer state stays here
    except Exception as e:   # truncated file, not a torch file at all
        raise unusable(e) from None
    # another model family (nanoGPT's checkpoints, a bare state dict) has other model_args, or none
    args = checkpoint.get("model_args") if isinstance(checkpoint, dict) else None
    unknown = sorted(set(args) - set(GPTConfig.__dataclass_fields__)) if isinstance(args, dict) else None
    if unknown is None or unknown or "model" not in checkpoint:
        what = f"model_args {', '.join(unknown)} are not GPTConfig's" if unknown else "it has no model and model_args"
        raise ValueError(f"{path} is not a nanoMoSE checkpoint ({what}): use one written by this repository's "
                         f"train.py; a dense GPT of this repository can be upcycled with --init_from=upcycle:DIR")
    try:
        model = GPT(GPTConfig(**args))
        # a compiled model's state dict has its keys prefixed with _orig_mod.
        state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
        model.load_state_dict(state)
    except Exception as e:   # wrong values, mismatched weights: all one story for the user
        raise unusable(e) from None
    return model.to(device), checkpoint


def load_meta(split_dir):
    """The dataset's meta.pkl as prepare_data.py wrote it (the tokenizer; for Gutenberg also train_authors, train.bin's
    authors in order with their token counts), or GPT-2's tokenizer where there is none. Raises ValueError (one
    line) for a truncated or foreign file."""
    path = os.path.join(split_dir, "meta.pkl")
    if not os.path.exists(path):
        return {"tokenizer": "gpt2", "vocab_size": 50257}
    try:
        meta = pickle.load(open(path, "rb"))
        meta["tokenizer"], meta["vocab_size"]
    except Exception as e:   # prepare_data.py writes it again
        raise ValueError(f"{path} is not a meta.pkl of prepare_data.py ({type(e).__name__}): run `python "
                         f"prepare_data.py {os.path.basename(split_dir)}` again") from None
    return meta


def held_out_authors(meta, n, train_path):
    """(tokens, names) of the last n authors of train.bin (train_path), from meta's train_authors. Raises
    ValueError (one line) where meta lists none that add up to train.bin, or n leaves no author to train on."""
    authors = meta.get("train_authors") or []
    if not os.path.exists(train_path):
        raise ValueError(f"no {train_path}: prepare the data first (prepare_data.py)")
    if sum(count for _, count in authors) != os.path.getsize(train_path) // 2:   # 2 bytes a token
        raise ValueError(f"holdout_authors needs the authors of {train_path}, and its meta.pkl lists none that add up "
                         f"to it (prepare_data.py gutenberg_char / gutenberg records them): prepare the data again, "
                         f"or use holdout_tokens")
    if n >= len(authors):
        raise ValueError(f"holdout_authors must leave an author to train on: train.bin has {len(authors)}, got {n}")
    return sum(count for _, count in authors[-n:]), [a for a, _ in authors[-n:]]


def check_tokenizer(meta, split_dir):
    """Raise ValueError unless the dataset in split_dir was tokenized as the checkpoint's text was (its
    `meta`): otherwise the same token ids mean other text, and nothing fails, the numbers are just wrong.
    A dataset without meta.pkl says nothing about its tokenizer, and passes."""
    path = os.path.join(split_dir, "meta.pkl")
    if not os.path.exists(path):
        return
    try:
        data = pickle.load(open(path, "rb"))
        same = meta["tokenizer"] == data["tokenizer"] and meta.get("stoi") == data.get("stoi")
    except Exception as e:
        raise ValueError(f"{path} is not a meta.pkl of prepare_data.py ({type(e).__name__}): prepare the data "
                         f"again") from None
    if not same:
        say = lambda m: f"{m['tokenizer']}, vocabulary of {m.get('vocab_size', '?')}"
        raise ValueError(f"the data in {split_dir} has another tokenizer or vocabulary ({say(data)}) than the "
                         f"checkpoint ({say(meta)}): use the dataset it was trained on (--data_dir, --dataset)")


def open_log(path, keep_bytes):
    """train.py's log.jsonl, opened to append. A resumed run continues it from its checkpoint: what a killed run
    logged after the checkpoint (and a line torn by the kill) is cut off to keep_bytes, since the resumed run
    logs those steps again. A run from scratch or upcycled (keep_bytes 0) starts a new log."""
    if keep_bytes is not None and os.path.exists(path) and os.path.getsize(path) > keep_bytes:
        os.truncate(path, keep_bytes)
    return open(path, "a")


def require_same(saved, config, keys, why, where):
    """Raise ValueError unless a saved model's GPTConfig agrees with this run's (config) on `keys`."""
    for key in keys:
        if getattr(saved, key) != getattr(config, key):
            raise ValueError(f"{why}: {key} is {getattr(saved, key)} in {where}, {getattr(config, key)} here "
                             f"(set --{key}={getattr(saved, key)})")


# -----------------------------------------------------------------------------
# upcycling: a trained dense or MoE checkpoint as the start of a MoSE run


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
        score = torch.zeros(ex.c_fc.size(0), ex.H, device=x.device)
        for e in range(ex.c_fc.size(0)):
            rows = x[(routing.expert_idx == e).any(dim=1)]
            if len(rows):
                a = rows @ ex.c_fc[e] + (ex.b_fc[e] if ex.b_fc is not None else 0)
                score[e] = F.gelu(a).abs().mean(dim=0)
        importance[layer] = score * ex.c_proj.norm(dim=2)
    return importance


def upcycle(source_dir, config, meta, split_dir, device, batches=None):
    """Build a model of GPTConfig `config` from a trained dense or MoE checkpoint in source_dir: attention,
    embeddings and norms are copied; a dense MLP is copied into every expert (sparse upcycling), an MoE layer's
    router and experts are kept. With batches (a few (x, y) on device) each expert's hidden units are then
    reordered by importance, so the narrow prefixes start from the most useful units. meta and split_dir: the
    run's tokenizer and data, which must be the checkpoint's. Raises ValueError / FileNotFoundError (one line)."""
    source, source_checkpoint = load_checkpoint(os.path.join(source_dir, "ckpt.pt"))
    check_tokenizer(source_checkpoint.get("meta") or meta, split_dir)
    require_same(source.config, config, ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"),
                 "upcycling keeps the architecture", source_dir)
    target = GPT(config)
    missing = target.load_state_dict({k: v for k, v in source.state_dict().items() if ".mlp." not in k},
                                     strict=False).missing_keys
    assert all(".mlp." in k for k in missing), missing
    for src, dst in zip(source.transformer.h, target.transformer.h):
        if not isinstance(dst.mlp, MoSELayer):
            if isinstance(src.mlp, MoSELayer):
                raise ValueError("upcycling cannot turn an MoE layer back into a dense one: match moe_stride")
            dst.mlp.load_state_dict(src.mlp.state_dict())
        elif isinstance(src.mlp, MoSELayer):
            require_same(source.config, config, ("n_exp", "expert_hidden"), "upcycling keeps an MoE layer's experts",
                         source_dir)
            dst.mlp.load_state_dict(src.mlp.state_dict())
        else:
            if config.expert_hidden != 4 * config.n_embd:
                raise ValueError(f"upcycling a dense MLP needs expert_hidden = 4 * n_embd = {4 * config.n_embd}")
            with torch.no_grad():
                dst.mlp.experts.c_fc.copy_(src.mlp.c_fc.weight.T.expand_as(dst.mlp.experts.c_fc))
                dst.mlp.experts.c_proj.copy_(src.mlp.c_proj.weight.T.expand_as(dst.mlp.experts.c_proj))
                if config.bias:
                    dst.mlp.experts.b_fc.copy_(src.mlp.c_fc.bias.expand_as(dst.mlp.experts.b_fc))
                    dst.mlp.experts.b_proj.copy_(src.mlp.c_proj.bias.expand_as(dst.mlp.experts.b_proj))
    target.to(device)   # the importance pass runs on real batches, which live on the device
    if batches is not None:
        for layer, score in hidden_unit_importance(target, batches).items():
            layer.experts.reorder_hidden_units_(score)
    return target
