"""Tests of sample.py on tiny checkpoints trained inside the test."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--n_exp=4", "--k_exp=2", "--expert_hidden=64",
        "--batch_size=8", "--block_size=64", "--eval_iters=1", "--log_interval=10", "--learning_rate=3e-3",
        "--max_iters=30", "--eval_interval=30", "--warmup_iters=5"]


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ckpts(char_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    for name, extra in (("mose", []), ("dense", ["--n_exp=0"])):
        p = run("train.py", f"--data_dir={char_data}", f"--out_dir={root / name}", *TINY, *extra)
        assert p.returncode == 0, p.stderr[-2000:]
    return root


def sample(ckpts, *args, model="mose"):
    return run("sample.py", f"--out_dir={ckpts / model}", "--num_samples=1", "--max_new_tokens=60", *args)


def spent(out):
    """(MFLOPs/token, % of full width, expert %) from the line printed after a sample."""
    m = re.search(r"spent ([\d.]+) MFLOPs/token \(([\d.]+)% of full width; experts ([\d.]+)%\), ([\d.]+) tokens/s", out)
    assert m, out
    return float(m[1]), float(m[2]), float(m[3])


@pytest.mark.parametrize("args", [
    ["--width=0.5"],
    ["--width=0.5", "--k_exp=1"],
    ["--policy=confidence", "--gamma=2", "--width=0.5"],
    ["--policy=uniform", "--budget=0.5"],
    ["--policy=confidence", "--budget=0.5", "--ttt_batches=4"],
    ["--policy=ttt", "--budget=0.5", "--ttt_batches=10", "--max_new_tokens=200"],
])
def test_each_policy_samples_and_reports_its_flops(ckpts, args):
    p = sample(ckpts, *args)
    assert p.returncode == 0, p.stderr[-2000:]
    flops, rel, experts = spent(p.stdout)
    full = float(re.search(r"full width at k_exp=\d: ([\d.]+) MFLOPs/token", p.stdout)[1])
    assert flops < full and rel < 100
    if "--budget=0.5" in args:
        # fitted on validation text, spent on the model's own samples: close, not exact
        assert abs(experts / 50 - 1) < 0.1, experts
    assert "operating point: policy" in p.stdout


def test_full_width_and_prompt_from_file(ckpts, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\nBut soft")
    p = sample(ckpts, f"--start=FILE:{prompt}")
    assert p.returncode == 0, p.stderr
    assert "ROMEO:\nBut soft" in p.stdout and spent(p.stdout)[1] == 100.0
    p = sample(ckpts, model="dense")
    assert p.returncode == 0 and spent(p.stdout)[1] == 100.0


@pytest.mark.parametrize("args,message,model", [
    (["--width=0"], "width must be in (0, 1]", "mose"),
    (["--budget=1.5"], "budget must be in (0, 1]", "mose"),
    (["--policy=bogus"], "policy must be one of uniform, confidence, ttt", "mose"),
    (["--policy=ttt"], "pass --budget", "mose"),
    (["--k_exp=9"], "k_exp must be in [1, n_exp=4]", "mose"),
    (["--foo=1"], "unknown config key 'foo'", "mose"),
    (["--start=Café ✓"], "outside this model's vocabulary: 'é', '✓'", "mose"),
    (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file", "mose"),
    (["--width=0.5"], "dense GPT", "dense"),
    (["--out_dir=/nonexistent"], "no checkpoint at /nonexistent", "mose"),
])
def test_bad_flags_are_one_clear_line(ckpts, args, message, model):
    p = sample(ckpts, *args, model=model)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
