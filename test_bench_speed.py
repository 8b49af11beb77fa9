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
           "--train_seq=32", "--decode_tokens=70", "--budgets=0.5", "--gammas=1.0", f"--json={out}"]
    run = subprocess.run([sys.executable, "bench_speed.py", *toy], cwd=HERE, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # the toy's sizes are named in the part (the OpenWebText-small sizes would be called that)
    dims = "2 layers, n_embd 64, 8 experts of 128, an MoE layer every 2"
    assert {r["part"] for r in rows} >= {"layer forward (fast)", "layer forward+backward (plain)", "fast", "decode",
                                         f"model forward ({dims}, random weights)",
                                         f"training step ({dims}, AdamW, heap=train)"}
    layer = {r["point"]: r for r in rows if r["part"] == "layer forward (fast)"}
    assert layer["uniform 0.5"]["flops_ratio"] == 0.5 and layer["uniform 1"]["time_ratio"] == 1.0
    assert 0.4 < layer["confidence gamma=1 budget=0.5"]["flops_ratio"] < 0.6   # Gamma fitted to the budget
    assert layer["random_pair"]["flops_ratio"] == 0.625   # the shipped law: 1 / 0.75 / 0.5 / 0.25 a quarter each
    decode = {r["point"]: r for r in rows if r["part"] == "decode"}
    assert all(r["tokens_per_s"] > 0 for r in decode.values())
    # decoding that recomputes the window past block_size is timed only where 70 tokens outgrow it: the toy
    # OpenWebText-small (block 64), not the Shakespeare model (block 128)
    assert "openwebtext-small width 1 recomputed" in decode and "shakespeare (0.8M) width 1 recomputed" not in decode
    train = {r["point"]: r for r in rows if r["part"] == f"training step ({dims}, AdamW, heap=train)"}
    assert train["MoSE step (width 1 + 0.5)"]["flops_ratio"] > 1.0                  # two passes
    assert 0.5 < train["MoSE step (random_pair)"]["flops_ratio"] < 1.0   # one pass, narrower pairs
    assert all(len(r["page_faults"]) == 1 for r in train.values())   # one count per timed step (plumbing only)
    assert "page faults a step (median): plain MoE step (width 1) " in run.stdout
    fast = {r["point"]: r for r in rows if r["part"] == "fast"}
    assert len(fast) == 8 and all(r["speedup"] > 0 and len(r["fast_times_s"]) == 1 for r in fast.values())


def test_bench_speed_takes_glibcs_own_heap_policy_and_names_it(tmp_path):
    out = tmp_path / "speed.json"
    toy = ["--parts=train", "--heap=glibc", "--repeats=2", "--n_layer=1", "--n_head=2", "--n_embd=32",
           "--moe_stride=1", "--expert_hidden=64", "--vocab_size=64", "--block_size=32", "--model_seq=32",
           "--train_seq=32", f"--json={out}"]
    run = subprocess.run([sys.executable, "bench_speed.py", *toy], cwd=HERE, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["heap"] == "glibc" and "heap=glibc" in r["part"] for r in rows)
    assert all(len(r["page_faults"]) == 2 for r in rows)


def test_bench_speed_rejects_an_unknown_part():
    run = subprocess.run([sys.executable, "bench_speed.py", "--parts=layer,speedy"], cwd=HERE, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "parts must be among" in run.stderr and "Traceback" not in run.stderr


# A stand-in for a nanoMoE checkout, mimicking only what the nanomoe part relies on: model.py (a module called
# 'model', like ours) importing the manager.py beside it; GPTConfig taking nanoMoE's names; GPT(config) with
# .config, forward(idx, targets) -> (logits, loss) and configure_optimizers(weight_decay, lr, betas, device_type);
# Router modules that return the tokens each expert kept, first, so the dropped fraction is read from them.
STANDIN_MODEL = '''
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F
from manager import MANAGER

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    n_exp: int = 1
    top_k: int = 2
    use_aux_loss: bool = False
    use_router_z_loss: bool = False
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    train_capacity: float = 1.25
    min_capacity: int = 4
    stride: int = 2
    router_use_full_prec: bool = False

class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config, self.w_g = config, nn.Linear(config.n_embd, config.n_exp, bias=False)
    def forward(self, x):
        c = self.config
        top = self.w_g(x).topk(c.top_k, dim=-1).indices.flatten()
        cap = max(c.min_capacity, int(c.top_k * c.train_capacity * x.shape[0] * x.shape[1] / c.n_exp))
        return torch.bincount(top, minlength=c.n_exp).clamp(max=cap), None, None

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.routers = nn.ModuleList([Router(config) for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        print("number of parameters: (the stand-in prints, as nanoMoE does)")
    def forward(self, idx, targets=None):
        x = self.wte(idx)
        for r in self.routers:
            r(x)
        logits = self.lm_head(x)
        return logits, MANAGER * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
'''


def test_bench_speed_runs_against_a_nanomoe_stand_in(tmp_path):
    (tmp_path / "model.py").write_text(STANDIN_MODEL)
    (tmp_path / "manager.py").write_text("MANAGER = 1.0\n")
    out = tmp_path / "speed.json"
    toy = ["--parts=nanomoe", f"--nanomoe={tmp_path}", "--nanomoe_tokens=16,64", "--nanomoe_seq=32",
           "--nanomoe_layer=1", "--nanomoe_head=2", "--nanomoe_embd=16", "--nanomoe_vocab=32", "--repeats=1",
           f"--json={out}"]
    run = subprocess.run([sys.executable, "bench_speed.py", *toy], cwd=HERE, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["tokens"]: r for r in json.loads(out.read_text())["rows"] if r["part"] == "nanomoe"}
    assert set(rows) == {16, 64} and (rows[16]["batch"], rows[16]["seq"]) == (1, 16) and rows[64]["batch"] == 2
    assert all(r["speedup"] > 0 and 0 <= r["nanomoe_dropped"] < 1 for r in rows.values())
    assert "time per token at 64 vs 16 tokens" in run.stdout


def test_bench_speed_nanomoe_fails_in_one_line_without_a_checkout(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.py").write_text("raise RuntimeError('not nanoMoE')\n")
    cases = {"": "--nanomoe=/path/to/nanoMoE", f"--nanomoe={tmp_path / 'nowhere'}": "no model.py in",
             f"--nanomoe={broken}": "RuntimeError: not nanoMoE"}
    for arg, says in cases.items():
        run = subprocess.run([sys.executable, "bench_speed.py", "--parts=nanomoe", *([arg] if arg else [])],
                             cwd=HERE, capture_output=True, text=True, timeout=120)
        err = run.stderr.strip()
        assert run.returncode != 0 and says in err and "\n" not in err and "Traceback" not in err, (arg, err)
