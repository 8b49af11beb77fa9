"""
Prepare a dataset for train.py: token ids as uint16 in data/<name>/train.bin and val.bin, plus meta.pkl
(the tokenizer, so checkpoints and sample.py know how to encode and decode).

    python prepare_data.py shakespeare_char           # Tiny Shakespeare, one token per character
    python prepare_data.py shakespeare                # Tiny Shakespeare, GPT-2 BPE (tiktoken)
    python prepare_data.py openwebtext                # GPT-2 BPE; needs `pip install datasets tqdm`, ~54GB
    python prepare_data.py NAME --input=my.txt --tokenizer=char|gpt2    # any UTF-8 text file

--input also replaces the download for shakespeare_char / shakespeare; --out_dir changes data/.
--train_fraction=0.25 keeps a quarter of the training split (every 4th block of 8,192 tokens; val unchanged), for
runs that ask how a result moves with the amount of data.
"""

import hashlib
import math
import os
import pickle
import sys

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SIZE = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def fail(msg, code=1):
    """One line on stderr and a non-zero exit: these are user errors, a traceback would only hide the fix."""
    print(f"prepare_data.py: {msg}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        sys.exit(0)
    if not argv or argv[0].startswith("-"):
        fail("name the dataset first: python prepare_data.py shakespeare_char|shakespeare|openwebtext|NAME "
             "[--input=PATH]", code=2)
    name, opts = argv[0], {"input": None, "tokenizer": None, "out_dir": "data", "train_fraction": "1"}
    for arg in argv[1:]:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or key not in opts:
            fail(f"unknown option '{arg}' (options: --input=PATH, --tokenizer=char|gpt2, --out_dir=DIR, "
                 f"--train_fraction=F)", code=2)
        opts[key] = value
    try:
        fraction = float(opts["train_fraction"])
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        fail(f"--train_fraction must be a number in (0, 1], got '{opts['train_fraction']}'", code=2)
    opts["train_fraction"] = fraction
    return name, opts


def fetch_shakespeare(path):
    """Download Tiny Shakespeare once; a download that cannot happen names the way around it."""
    if not os.path.exists(path):
        import requests
        try:
            r = requests.get(SHAKESPEARE_URL, timeout=30)
            r.raise_for_status()
        except requests.RequestException as e:
            fail(f"could not download Tiny Shakespeare ({type(e).__name__}). "
                 f"Pass a local copy of {SHAKESPEARE_URL} with --input=PATH/input.txt")
        with open(path + ".part", "wb") as f:   # renamed only when complete: a half file is never reused
            f.write(r.content)
        os.replace(path + ".part", path)
    return path


def check_shakespeare(path, given):
    """The expected token counts (and any comparison with other runs) only hold for this exact file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != SHAKESPEARE_SIZE or hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        fix = "pass the right file with --input" if given else "delete it to download again, or pass one with --input"
        fail(f"{path} is not Tiny Shakespeare: {len(data):,} bytes, expected {SHAKESPEARE_SIZE:,} bytes with "
             f"sha256 {SHAKESPEARE_SHA256}; {fix}")


def write_split(ids, path):
    ids = np.asarray(ids)
    if ids.size and ids.max() > np.iinfo(np.uint16).max:
        fail(f"token id {ids.max()} does not fit in uint16: the vocabulary is too large for this format")
    ids.astype(np.uint16).tofile(path)


def train_subset(ids, fraction, block=8192):
    """A data-scaling run's smaller training split: `fraction` of the blocks of `block` tokens, spread evenly over
    the whole split (0.25: blocks 0, 4, 8, ...), so the subset mixes the same plays as the full text, and the
    validation text, which continues the last play, is as near to it as to the full split."""
    blocks = range(0, len(ids), block)
    step = lambda i: math.floor(i * fraction + 1e-9)           # block i is kept where this count goes up
    keep = [i for i in range(len(blocks)) if step(i) > step(i - 1)]
    return np.concatenate([np.asarray(ids[blocks[i]:blocks[i] + block]) for i in keep])


def char_tokenizer(text):
    chars = sorted(set(text))   # the vocabulary: every character of the whole text
    stoi = {ch: i for i, ch in enumerate(chars)}
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    return (lambda s: [stoi[c] for c in s]), meta


def gpt2_encoding():
    import tiktoken
    try:   # tiktoken downloads its BPE files on first use; offline it needs a cache (TIKTOKEN_CACHE_DIR)
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        fail(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}): go online once, or set "
             f"TIKTOKEN_CACHE_DIR to a folder holding its cached files")


def gpt2_tokenizer(text):
    enc = gpt2_encoding()
    return enc.encode_ordinary, {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}


def prepare_text(text, tokenizer, out, train_fraction=1.0):
    encode, meta = char_tokenizer(text) if tokenizer == "char" else gpt2_tokenizer(text)
    if meta["vocab_size"] > 65536:   # fail before writing anything rather than leave a half-written dataset
        fail(f"{meta['vocab_size']:,} distinct characters: token ids must fit in uint16 (at most 65,536); "
             f"use --tokenizer=gpt2")
    os.makedirs(out, exist_ok=True)
    n = int(0.9 * len(text))   # first 90% of the text is train, the last 10% val: no overlap between them
    train_ids, val_ids = encode(text[:n]), encode(text[n:])
    if train_fraction < 1:   # the vocabulary above still comes from the whole text: checkpoints stay comparable
        full, train_ids = len(train_ids), train_subset(train_ids, train_fraction)
        print(f"--train_fraction={train_fraction:g}: {len(train_ids):,} of the {full:,} training tokens")
    write_split(train_ids, os.path.join(out, "train.bin"))
    write_split(val_ids, os.path.join(out, "val.bin"))
    with open(os.path.join(out, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    print(f"{len(text):,} characters, vocabulary {meta['vocab_size']:,} ({tokenizer})")
    # shakespeare_char: 1,115,394 characters, vocabulary 65; shakespeare: vocabulary 50,257
    print(f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens -> {out}")
    # shakespeare_char: train 1,003,854 tokens, val 111,540 tokens
    # shakespeare (gpt2): train 301,966 tokens, val 36,059 tokens


def prepare_openwebtext(out, num_proc=8):
    """OpenWebText with GPT-2 BPE: ~9B train tokens (~17GB), ~4M val tokens. One EOT token ends each document."""
    try:
        from datasets import load_dataset
    except ImportError:
        fail("openwebtext needs the 'datasets' package: pip install datasets")
    enc = gpt2_encoding()
    os.makedirs(out, exist_ok=True)
    split = load_dataset("openwebtext", num_proc=num_proc)["train"].train_test_split(
        test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")

    def tokenize(example):
        ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]
        return {"ids": ids, "len": len(ids)}
    tokenized = split.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda it, **kw: it
    for name, dset in tokenized.items():
        total = int(np.sum(dset["len"], dtype=np.uint64))
        arr = np.memmap(os.path.join(out, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(total,))
        shards, pos = 1024, 0   # write in shards so the whole split never has to sit in memory
        for i in tqdm(range(shards), desc=f"writing {name}.bin"):
            batch = dset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
            arr[pos:pos + len(ids)] = ids
            pos += len(ids)
        arr.flush()
        print(f"{name}: {total:,} tokens")
    with open(os.path.join(out, "meta.pkl"), "wb") as f:
        pickle.dump({"tokenizer": "gpt2", "vocab_size": enc.n_vocab}, f)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    name, opts = parse_args(sys.argv[1:])
    tokenizer = opts["tokenizer"] or {"shakespeare_char": "char"}.get(name, "gpt2")
    if tokenizer not in ("char", "gpt2"):
        fail(f"--tokenizer must be char or gpt2, got '{tokenizer}'")
    out = os.path.join(opts["out_dir"], name)
    given = opts["input"] is not None
    if given and not os.path.isfile(opts["input"]):
        fail(f"--input={opts['input']}: no such file")
    if name == "openwebtext" and not given:
        if tokenizer != "gpt2":
            fail("openwebtext is prepared with --tokenizer=gpt2 only")
        if opts["train_fraction"] < 1:
            fail("--train_fraction is for text files and Shakespeare; for openwebtext shorten the run instead "
                 "(train.py --max_train_flops)")
        prepare_openwebtext(out)
        sys.exit(0)
    if name in ("shakespeare_char", "shakespeare"):
        if not given:
            os.makedirs(out, exist_ok=True)
        path = opts["input"] if given else fetch_shakespeare(os.path.join(out, "input.txt"))
        check_shakespeare(path, given)
    elif not given:
        fail(f"'{name}' is not a known dataset (shakespeare_char, shakespeare, openwebtext): "
             f"pass your own text with --input=PATH")
    else:
        path = opts["input"]
    try:   # newline="": keep the text exactly as it is in the file (\r\n included), so decoding gives it back
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, e.g. iconv -t UTF-8")
    if not text.strip():   # nothing to learn from, and train.py would only fail later on an empty split
        fail(f"{path} is empty{' (only whitespace)' if text else ''}: give a text file with --input=PATH")
    prepare_text(text, tokenizer, out, opts["train_fraction"])
