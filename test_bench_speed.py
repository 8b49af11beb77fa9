"""Smoke test of bench_speed.py at toy sizes: every part runs and writes its rows (no timing is asserted).
Run: python -m pytest -q test_bench_speed.py"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_speed_runs_every_part_and_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    toy = ["--repeats=1", "--n_layer=2", "--n_head=2", "--n_embd=64", "--expert_hidden=128", "--width_multiple=16",
           "--vocab_size=128", "--block_size=64", "--layer_tokens=64", "--model_batch=1", "--model_seq=32",
           "--train_seq=32", "--decode_tokens=3", "--budgets=0.5", "--gammas=1.0", f"--json={out}"]
    run = subprocess.run([sys.executable, "bench_speed.py", *toy], cwd=HERE, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["part"] for r in rows} >= {"layer forward (dispatch)", "layer forward+backward (dispatch_loop)",
                                         "model forward (OpenWebText-small, random weights)",
                                         "training step (OpenWebText-small, AdamW)", "decode"}
    layer = {r["point"]: r for r in rows if r["part"] == "layer forward (dispatch)"}
    assert layer["uniform 0.5"]["flops_ratio"] == 0.5 and layer["uniform 1"]["time_ratio"] == 1.0
    assert 0.4 < layer["confidence gamma=1 budget=0.5"]["flops_ratio"] < 0.6   # Gamma fitted to the budget
    assert all(r["tokens_per_s"] > 0 for r in rows if r["part"] == "decode")


def test_bench_speed_rejects_an_unknown_part():
    run = subprocess.run([sys.executable, "bench_speed.py", "--parts=layer,speedy"], cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "parts must be among" in run.stderr and "Traceback" not in run.stderr
