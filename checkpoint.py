"""
Checkpoints and tokenizers, shared by train.py, sample.py and bench_flops.py: a checkpoint is written
atomically (a crash never leaves a half-written file in place of the last good one) and read back with one
clear line when it is missing, truncated or not ours; the tokenizer travels inside it (meta.pkl's contents).
"""

import os
import pickle

import torch

from model import GPT, GPTConfig

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
