"""Tests of prepare_data.py on the shared Tiny Shakespeare copy and on small files made here."""

import os
import pickle
import subprocess
import sys

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


def one_line_error(p, *words):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
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


def test_gpt2_shakespeare(shared_data, tmp_path):
    p = prepare("shakespeare", f"--input={shared_data / 'tinyshakespeare' / 'input.txt'}", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path, "shakespeare")
    assert (len(train), len(val), meta["tokenizer"], meta["vocab_size"]) == (301_966, 36_059, "gpt2", 50257)


def test_any_text_file_keeps_non_ascii(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text("héllo wörld ✓\n" * 50, encoding="utf-8")
    assert prepare("mine", f"--input={src}", "--tokenizer=char", f"--out_dir={tmp_path}").returncode == 0
    train, val, meta = load(tmp_path, "mine")
    assert {"é", "ö", "✓"} <= set(meta["stoi"])
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == src.read_text(encoding="utf-8")


def test_wrong_shakespeare_file_is_refused(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    one_line_error(prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path}"), "1,115,394 bytes", "--input")


def test_offline_download_names_the_fix(tmp_path):
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    one_line_error(prepare("shakespeare_char", f"--out_dir={tmp_path}", env=env), "--input=")
    assert not (tmp_path / "shakespeare_char" / "input.txt").exists()   # no half-written download left


@pytest.mark.parametrize("args,words", [
    (["shakespeare_char", "--inptu=x"], ["unknown option '--inptu=x'"]),
    (["mine", "--input=README.md", "--tokenizer=bpe"], ["--tokenizer must be char or gpt2"]),
    (["mine", "--input=/no/such/file.txt"], ["no such file"]),
    (["mine"], ["not a known dataset", "--input"]),
])
def test_bad_arguments_are_one_clear_line(args, words, tmp_path):
    one_line_error(prepare(*args, f"--out_dir={tmp_path}"), *words)
