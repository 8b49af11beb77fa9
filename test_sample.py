"""Tests of sample.py end to end, on tiny checkpoints written here (seconds to build, no background training
needed). The text is Tiny Shakespeare when the shared test data is there, else generated."""

import dataclasses
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import save_checkpoint
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32


def make_text(request):
    try:
        path = request.getfixturevalue("shared_data") / "tinyshakespeare" / "input.txt"
        return path.read_text(encoding="utf-8")[:200_000]
    except pytest.skip.Exception:   # no shared data: words enough to give the model a vocabulary and a val split
        rng = random.Random(0)
        words = "the king and queen of a fair land spake to thee my lord what say you now good night".split()
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + rng.choice(".,;?!:")
                 for _ in range(2000)]
        return "\n".join(lines) + "\n"


def write_data(root, text, encode):
    """<root>/data/tiny/{train,val}.bin as train.py reads them."""
    ids = np.array(encode(text), dtype=np.uint16)
    split = int(0.9 * len(ids))
    out = root / "data" / "tiny"
    out.mkdir(parents=True)
    ids[:split].tofile(out / "train.bin")
    ids[split:].tofile(out / "val.bin")
    return torch.from_numpy(ids[:split].astype(np.int64))


def write_checkpoint(out_dir, model, meta, data_dir, steps, train, widths):
    """A few AdamW steps (so the router has preferences), then a checkpoint with train.py's keys."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ix = torch.randint(len(train) - BLOCK - 1, (8,), generator=gen)
        x = torch.stack([train[i:i + BLOCK] for i in ix])
        y = torch.stack([train[i + 1:i + 1 + BLOCK] for i in ix])
        for w in widths:   # the MoSE recipe in miniature: full width plus a narrow one
            out = model(x, y, width=w)
            (out.loss + out.router_loss).backward()
        opt.step()
        opt.zero_grad()
    out_dir.mkdir()
    config = dict(data_dir=str(data_dir), dataset="tiny", block_size=BLOCK, n_exp=model.config.n_exp)
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "config": config,
                     "meta": meta, "iter_num": steps, "best_val_loss": 9.9}, str(out_dir / "ckpt.pt"))


def char_data(request, root):
    """A character-level dataset under root/data from make_text, one torch thread for the module: (meta, train)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    text = make_text(request)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    return meta, write_data(root, text, lambda s: [stoi[c] for c in s])


@pytest.fixture(scope="module")
def ckpts(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    meta, train = char_data(request, root)
    torch.manual_seed(0)
    tiny = dict(block_size=BLOCK, vocab_size=meta["vocab_size"], n_layer=2, n_head=2, n_embd=32)
    write_checkpoint(root / "mose", GPT(GPTConfig(**tiny, n_exp=4, k_exp=2, expert_hidden=64)), meta,
                     root / "data", 30, train, (None, 0.5))
    write_checkpoint(root / "dense", GPT(GPTConfig(**tiny, n_exp=0)), meta, root / "data", 10, train, (None,))
    return root


def sample(ckpts, *args, model="mose", **env):
    # one thread: the models are tiny, and on a busy 2-core machine torch's thread pool mostly waits on itself
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "sample.py", f"--out_dir={ckpts / model}", "--num_samples=1",
                           "--max_new_tokens=48", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def spent(out):
    """(MFLOPs/token, % of full width, expert %) from the line printed after the sample."""
    m = re.search(r"spent ([\d.]+) MFLOPs/token \(([\d.]+) % of full width[^;]*; (?:experts ([\d.]+) %|dense)", out)
    assert m, out
    return float(m[1]), float(m[2]), float(m[3]) if m[3] else None


@pytest.mark.parametrize("args", [
    ["--width=0.5"],
    ["--width=0.5", "--k_exp=1"],
    ["--policy=confidence", "--gamma=2", "--width=0.5"],
    ["--policy=confidence", "--budget=0.5", "--ttt_batches=5"],
    ["--policy=ttt", "--budget=0.5", "--ttt_batches=5", "--max_new_tokens=96"],
    ["--policy=confidence", "--gamma=2", "--width=0.5", "--dtype=bfloat16"],
])
def test_each_policy_samples_and_reports_its_flops(ckpts, args):
    p = sample(ckpts, *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "operating point: policy" in p.stdout and "---------------" in p.stdout
    flops, rel, experts = spent(p.stdout)
    assert flops > 0 and rel < 100 and 0 < experts < 100
    if "--policy=ttt" in args:
        # gamma learned and Gamma fitted on calibration (training) text, spent on the model's own samples: within 5 %
        assert abs(experts / 50 - 1) < 0.05, p.stdout
    elif "--budget=0.5" in args:
        assert abs(experts / 50 - 1) < 0.1, p.stdout
    if "--k_exp=1" in args:   # one expert at half width: a quarter of the training k's expert FLOPs
        assert "at k_exp=2" in p.stdout and experts == 50.0


def test_budget_spends_less_than_full_width_and_prompt_from_file(ckpts, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the king:\nWhat say you")
    full = sample(ckpts, f"--start=FILE:{prompt}")
    assert full.returncode == 0, full.stderr
    assert "the king:\nWhat say you" in full.stdout
    half = sample(ckpts, "--budget=0.5")   # uniform: width = budget
    assert half.returncode == 0, half.stderr
    (f_full, rel_full, exp_full), (f_half, rel_half, exp_half) = spent(full.stdout), spent(half.stdout)
    assert rel_full == 100.0 and exp_full == 100.0 and exp_half == 50.0
    assert f_half < f_full and rel_half < 100
    ref = float(re.search(r"full width: ([\d.]+) MFLOPs/token", full.stdout)[1])
    assert ref == f_full


def test_route_top_p_is_a_dial(ckpts):
    # a mass below any token's top probability (>= 1/n_exp) takes one expert per token: top-1 routing exactly,
    # the same text from the same seed and half the expert FLOPs of k_exp=2
    tiny, top1 = sample(ckpts, "--route_top_p=0.01"), sample(ckpts, "--k_exp=1")
    assert tiny.returncode == 0 and top1.returncode == 0, tiny.stderr + top1.stderr
    assert "top-p routing 0.01" in tiny.stdout
    text = lambda out: out.split("operating point:")[1].split("\n", 1)[1].split("\nspent ")[0]
    assert text(tiny.stdout) == text(top1.stdout)
    assert spent(tiny.stdout)[0] == spent(top1.stdout)[0] and spent(tiny.stdout)[2] == 50.0


def test_dense_checkpoint_samples(ckpts):
    p = sample(ckpts, "--start=the", model="dense")
    assert p.returncode == 0, p.stderr
    assert "operating point: dense GPT" in p.stdout and spent(p.stdout)[1:] == (100.0, None)


def test_prompt_characters_outside_the_vocabulary_read_as_unk(ckpts):
    # a vocabulary with a replacement symbol (prepare_data.py gutenberg_char's U+FFFD) reads unknown characters as
    # it, as training did; without one (the mose checkpoint) they are refused (test_bad_flags_are_one_clear_line)
    checkpoint = torch.load(ckpts / "dense" / "ckpt.pt", weights_only=False)
    unk = checkpoint["meta"]["itos"][0]
    checkpoint["meta"] = {**checkpoint["meta"], "unk": unk}
    (ckpts / "dense-unk").mkdir(exist_ok=True)
    save_checkpoint(checkpoint, str(ckpts / "dense-unk" / "ckpt.pt"))
    p = sample(ckpts, "--start=thé ✓", model="dense-unk")
    assert p.returncode == 0, p.stderr
    assert f"'é', '✓' are outside this model's vocabulary: read as {unk!r}" in p.stderr
    assert f"th{unk} {unk}" in p.stdout


def test_gpt2_tokenizer(ckpts, request):
    request.getfixturevalue("shared_data")   # tiktoken's GPT-2 files come from there (skips without)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, n_exp=4, k_exp=2,
                          expert_hidden=64))
    (ckpts / "bpe").mkdir(exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config),
                     "config": {"data_dir": "", "dataset": ""}, "meta": {"tokenizer": "gpt2", "vocab_size": 50257},
                     "iter_num": 0, "best_val_loss": 9.9}, str(ckpts / "bpe" / "ckpt.pt"))
    p = sample(ckpts, "--start=Hello, world<|endoftext|>", "--max_new_tokens=8", "--width=0.25", model="bpe")
    assert p.returncode == 0, p.stderr
    assert "Hello, world<|endoftext|>" in p.stdout and spent(p.stdout)[2] == 25.0
    # offline without tiktoken's files: one line naming the fix (every proxy at a closed port: no download)
    proxies = {k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    p = sample(ckpts, "--start=Hello", model="bpe", TIKTOKEN_CACHE_DIR=str(ckpts / "empty_cache"), **proxies)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("sample.py: could not load tiktoken's gpt2 encoding") and "TIKTOKEN_CACHE_DIR" in p.stderr


@pytest.mark.parametrize("args,message,model", [
    (["--width=0"], "width must be in (0, 1], got 0.0", "mose"),
    (["--budget=1.5"], "budget must be in (0, 1]", "mose"),
    (["--policy=bogus"], "policy must be one of uniform, confidence, ttt, search, allocate, width_top_p; got 'bogus'", "mose"),
    (["--policy=ttt"], "policy 'ttt' learns gamma for a FLOPs budget", "mose"),
    (["--k_exp=9"], "k_exp must be an integer in [1, n_exp=4]", "mose"),
    (["--foo=1"], "unknown config key 'foo'", "mose"),
    (["--start=thé ✓"], "outside this model's vocabulary: 'é', '✓'", "mose"),
    (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file", "mose"),
    (["--width=0.5", "--budget=0.5"], "--width and --budget both set the compute", "mose"),
    (["--policy=confidence", "--budget=0.5", "--data_dir=/nowhere"], "no /nowhere/tiny/train.bin", "mose"),
    (["--route_top_p=1.5"], "route_top_p is a probability mass in (0, 1], got 1.5", "mose"),
    (["--route_top_p=0.5"], "dense GPT (n_exp=0)", "dense"),
    (["--width=0.5"], "dense GPT (n_exp=0)", "dense"),
    (["--budget=0.5"], "dense GPT (n_exp=0)", "dense"),
    (["--out_dir=/nonexistent"], "no checkpoint at /nonexistent/ckpt.pt", "mose"),
    (["--dtype=half"], "dtype must be auto, float32, bfloat16, float16; got 'half'", "mose"),
    pytest.param(["--device=cuda"], "device 'cuda' is not available on this machine", "mose",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has cuda")),
])
def test_bad_flags_are_one_clear_line(ckpts, args, message, model):
    p = sample(ckpts, *args, model=model)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
    assert p.stderr.startswith("sample.py: ")
