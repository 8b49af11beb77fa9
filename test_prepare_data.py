"""Tests of prepare_data.py on the shared Tiny Shakespeare copy and on small files made here."""

import os
import pickle
import subprocess
import sys

import importlib.util

import numpy as np
import pytest

REPO = os.path.dirname(os.path.abspath(__file__))


def prepare(*args, env=None):
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def load(out, name):
    d = os.path.join(out, name)
    train, val = (np.fromfile(os.path.join(d, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val"))
    return train, val, pickle.load(open(os.path.join(d, "meta.pkl"), "rb"))


def offline_env(**extra):
    """Every proxy variable (lower case wins in requests) points at a closed port: any download fails at once."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[k] = "http://127.0.0.1:9"
    return dict(env, **extra)


def one_line_error(p, *words, code=None):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert code is None or p.returncode == code, (p.returncode, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert all(w in p.stderr for w in words), p.stderr


def test_char_level_shakespeare(shared_data, tmp_path):
    src = shared_data / "tinyshakespeare" / "input.txt"
    assert prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path}").returncode == 0
    train, val, meta = load(tmp_path, "shakespeare_char")
    assert (len(train), len(val), meta["vocab_size"], meta["tokenizer"]) == (1_003_854, 111_540, 65, "char")
    text = src.read_text()
    assert "".join(meta["itos"][int(i)] for i in train[:100]) == text[:100]
    assert "".join(meta["itos"][int(i)] for i in val[-50:]) == text[-50:]


def test_train_fraction_keeps_evenly_spread_blocks(shared_data, tmp_path):
    # a data-scaling run's smaller dataset: every 4th block of 8,192 training tokens, the same val and vocabulary
    src = shared_data / "tinyshakespeare" / "input.txt"
    assert prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path / 'full'}").returncode == 0
    p = prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path / 'q'}", "--train_fraction=0.25")
    assert p.returncode == 0 and "253,952 of the 1,003,854 training tokens" in p.stdout, p.stderr
    full, val, meta = load(tmp_path / "full", "shakespeare_char")
    train, val_q, meta_q = load(tmp_path / "q", "shakespeare_char")
    blocks = [full[i:i + 8192] for i in range(0, len(full), 8192)]
    assert np.array_equal(train, np.concatenate(blocks[::4]))       # blocks 0, 4, 8, ... of the whole split
    assert np.array_equal(val, val_q) and meta == meta_q
    for bad in ("0", "1.5", "half"):
        one_line_error(prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path}", f"--train_fraction={bad}"),
                       "--train_fraction must be a number in (0, 1]", bad, code=2)


def test_gpt2_shakespeare(shared_data, tmp_path):
    p = prepare("shakespeare", f"--input={shared_data / 'tinyshakespeare' / 'input.txt'}", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path, "shakespeare")
    assert (len(train), len(val), meta["tokenizer"], meta["vocab_size"]) == (301_966, 36_059, "gpt2", 50257)


def test_any_text_file_keeps_non_ascii(tmp_path):
    src = tmp_path / "mine.txt"
    text = "héllo wörld ✓\n" * 50 + "windows line\r\n"
    src.write_bytes(text.encode("utf-8"))
    p = prepare("mine", f"--input={src}", "--tokenizer=char", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path, "mine")
    assert {"é", "ö", "✓", "\r"} <= set(meta["stoi"]) and meta["vocab_size"] == len(set(text))
    assert len(train) == int(0.9 * len(text))   # split by position: the first 90% is train
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == text   # the file, exactly


def test_char_vocab_too_big_for_uint16(tmp_path):
    src = tmp_path / "wide.txt"
    src.write_text("".join(chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000),
                   encoding="utf-8")
    one_line_error(prepare("wide", f"--input={src}", "--tokenizer=char", f"--out_dir={tmp_path}"), "uint16")
    assert not (tmp_path / "wide").exists()   # nothing half-written


def test_gpt2_without_tiktoken_files_offline(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text("hello world\n", encoding="utf-8")
    env = offline_env(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"))
    one_line_error(prepare("mine", f"--input={src}", "--tokenizer=gpt2", f"--out_dir={tmp_path}", env=env),
                   "TIKTOKEN_CACHE_DIR")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="'datasets' is installed")
def test_openwebtext_needs_datasets(tmp_path):
    p = prepare("openwebtext", f"--out_dir={tmp_path}")
    one_line_error(p, "pip install datasets", code=1)
    assert p.stderr.strip() == "prepare_data.py: openwebtext needs the 'datasets' package: pip install datasets"
    one_line_error(prepare("openwebtext", f"--out_dir={tmp_path}", "--train_fraction=0.5"), "--max_train_flops", code=1)


def test_wrong_shakespeare_file_is_refused(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    one_line_error(prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path}"), "1,115,394 bytes",
                   "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "--input")
    assert not (tmp_path / "shakespeare_char").exists()


def test_offline_download_names_the_fix(tmp_path):
    one_line_error(prepare("shakespeare_char", f"--out_dir={tmp_path}", env=offline_env()), "--input=", code=1)
    assert not (tmp_path / "shakespeare_char" / "input.txt").exists()   # no half-written download left


def test_downloaded_copy_is_reused_and_checked(shared_data, tmp_path):
    """A data/<name>/input.txt from an earlier download is used as is (no network), after the same check."""
    (tmp_path / "shakespeare_char").mkdir()
    cached = tmp_path / "shakespeare_char" / "input.txt"
    cached.write_bytes((shared_data / "tinyshakespeare" / "input.txt").read_bytes())
    p = prepare("shakespeare_char", f"--out_dir={tmp_path}", env=offline_env())
    assert p.returncode == 0 and "train 1,003,854 tokens, val 111,540 tokens" in p.stdout, p.stderr
    cached.write_bytes(cached.read_bytes()[:-1])
    one_line_error(prepare("shakespeare_char", f"--out_dir={tmp_path}", env=offline_env()), "delete it")


@pytest.mark.parametrize("args,words,code", [
    (["shakespeare_char", "--inptu=x"], ["unknown option '--inptu=x'"], 2),
    (["shakespeare_char", "--input"], ["unknown option '--input'"], 2),
    (["--input=x.txt"], ["name the dataset first"], 2),
    (["mine", "--input=README.md", "--tokenizer=bpe"], ["--tokenizer must be char or gpt2"], 1),
    (["mine", "--input=/no/such/file.txt"], ["no such file"], 1),
    (["mine", "--input="], ["no such file"], 1),
    (["mine"], ["not a known dataset", "--input"], 1),
])
def test_bad_arguments_are_one_clear_line(args, words, code, tmp_path):
    one_line_error(prepare(*args, f"--out_dir={tmp_path}"), *words, code=code)
    assert not os.listdir(tmp_path)   # an error writes nothing


def test_help():
    p = prepare("--help")
    assert p.returncode == 0 and "--tokenizer=char|gpt2" in p.stdout
