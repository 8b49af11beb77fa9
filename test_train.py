"""Tests of train.py end to end, on the character-level Tiny Shakespeare prepared by prepare_data.py.
Each run is a real subprocess with a tiny model, so what is tested is what a user runs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--n_exp=4", "--k_exp=2", "--expert_hidden=64",
        "--batch_size=4", "--block_size=32", "--eval_iters=2", "--log_interval=1", "--learning_rate=3e-3",
        "--warmup_iters=2", "--eval_k=(1,)"]


def run(*args, ok=True, torchrun=False):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + ["train.py", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture
def data_dir(char_data):
    return char_data


def train(data_dir, out_dir, *extra, **kw):
    return run(f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *extra, **kw)


def log_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in log_rows(out_dir) if "loss" in r}


def test_thirty_steps_lower_the_loss(data_dir, tmp_path):
    train(data_dir, tmp_path, "--max_iters=30", "--eval_interval=30")
    evals = [r for r in log_rows(tmp_path) if "val/w=1" in r]
    assert evals[-1]["val/w=1"] < evals[0]["val/w=1"] - 0.5      # from ~4.2 (uniform over 65 chars)
    assert {"val/w=0.5", "val/w=0.25", "val/w=1,k=1"} <= set(evals[-1])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["meta"]["tokenizer"] == "char" and ckpt["model_args"]["n_exp"] == 4 and ckpt["iter_num"] == 30


@pytest.mark.parametrize("extra,check", [
    (["--width_sampling=max_random"], lambda w: w[0] == 1.0 and len(w) == 2 and 0.25 <= w[1] <= 1),
    (["--width_sampling=sandwich", "--n_random_widths=2", "--w_min=0.3"],
     lambda w: w[:2] == [1.0, 0.3] and len(w) == 4 and all(0.3 <= x <= 1 for x in w)),
    (["--width_sampling=fixed", "--fixed_widths=(0.5,1.0,0.75)"], lambda w: w == [1.0, 0.75, 0.5]),
    (["--width_sampling=none"], lambda w: w == [1.0]),
    (["--width_sampling=max_random", "--width_per_layer=True", "--moe_stride=1", "--width_grid=0.05", "--width_mix=()",
      "--distill_weight=0.5"],
     lambda w: len(w[1]) == 2 and all(abs(x / 0.05 - round(x / 0.05)) < 1e-9 for x in w[1])),
])
def test_width_sampling_schemes(data_dir, tmp_path, extra, check):
    train(data_dir, tmp_path, "--max_iters=4", "--eval_interval=4", *extra)
    rows = [r for r in log_rows(tmp_path) if "widths" in r]
    assert len(rows) == 4 and all(check(r["widths"]) for r in rows), rows


def test_elastic_k_schemes(data_dir, tmp_path):
    # Matryoshka MoE layer-wise k, with Elastic MoE co-activation sampling and hierarchical router loss
    train(data_dir, tmp_path, "--max_iters=6", "--eval_interval=6", "--moe_stride=1", "--k_sampling=layer",
          "--k_min=1", "--k_max=3", "--k_pool=4", "--hr_loss_weight=0.01")
    ks = [r["k"] for r in log_rows(tmp_path) if "k" in r]
    assert all(len(k) == 2 and all(1 <= x <= 3 for x in k) for k in ks) and len({tuple(k) for k in ks}) > 1


def test_bfloat16_autocast_trains_on_cpu(data_dir, tmp_path):
    # the mixed-precision path a GPU takes, on the CPU: autocast to bf16, router in fp32, no GradScaler
    p = train(data_dir, tmp_path, "--max_iters=6", "--eval_interval=6", "--dtype=bfloat16")
    assert "dtype bfloat16" in p.stdout
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1]


def test_resume_is_exact(data_dir, tmp_path):
    # a fixed schedule length: with lr_decay_iters=0 it would follow each run's max_iters
    common = ["--eval_interval=5", "--always_save_checkpoint=True", "--dropout=0.1", "--k_pool=3", "--lr_decay_iters=10"]
    train(data_dir, tmp_path / "a", "--max_iters=10", *common)
    train(data_dir, tmp_path / "b", "--max_iters=5", *common)
    train(data_dir, tmp_path / "b", "--max_iters=10", "--init_from=resume", *common)
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert a == b   # bit-identical: RNG states, data position and optimizer all restored


def test_resume_checks_the_architecture_and_stops_at_max_iters(data_dir, tmp_path):
    train(data_dir, tmp_path, "--max_iters=4", "--eval_interval=2", "--eval_widths=(0.5,)")
    evals = [r for r in log_rows(tmp_path) if "val/w=1" in r]
    assert evals and all("val/w=0.5" in r for r in evals)   # full width is always evaluated (it picks the best)
    rows = log_rows(tmp_path)
    p = train(data_dir, tmp_path, "--max_iters=2", "--init_from=resume", "--eval_widths=(0.5,)")   # past max_iters
    assert p.returncode == 0 and not train_losses(tmp_path).keys() - set(range(1, 5))
    # one evaluation, no training: the log is cut back to the checkpoint, whose evaluation is logged again
    after = log_rows(tmp_path)
    assert after == rows[:len(after)] and "val/w=1" in after[-1]
    p = train(data_dir, tmp_path, "--max_iters=6", "--init_from=resume", "--block_size=16", ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "resume keeps the architecture: block_size is 32 in the checkpoint, 16 here (set --block_size=32)" \
        in p.stderr


def test_too_little_text_is_one_clear_line(data_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    (small / "train.bin").write_bytes(open(os.path.join(data_dir, "shakespeare_char", "train.bin"), "rb").read())
    (small / "val.bin").write_bytes(bytes(2 * 20))   # 20 tokens, less than one window of 32 + 1
    p = run(f"--data_dir={tmp_path}", "--dataset=small", f"--out_dir={tmp_path / 'out'}", *TINY, ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "val.bin has 20 tokens, too few for one window of block_size 32 + 1" in p.stderr


def test_configurator_takes_string_values_as_text():
    from configurator import configure
    values = dict(start="\n", max_iters=10, widths=(1.0,))
    configure(values, ["--start=1999", "--max_iters=20", "--widths=0.5,0.25"])
    assert values == dict(start="1999", max_iters=20, widths=(0.5, 0.25))


def test_truncated_checkpoint_fails_clearly_and_atomic_save_keeps_the_old_one(data_dir, tmp_path, monkeypatch):
    train(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    path = tmp_path / "ckpt.pt"
    good = path.read_bytes()
    # a crash in the middle of writing leaves the previous checkpoint as it was
    real_save = torch.save

    def crash(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == good and not os.path.exists(f"{path}.tmp")
    load_checkpoint(str(path))
    # a truncated ckpt.pt (e.g. copied half-way) gives one clear line, not a traceback
    path.write_bytes(good[:len(good) // 2])
    p = train(data_dir, tmp_path, "--max_iters=4", "--init_from=resume", ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "not a usable checkpoint" in p.stderr


@pytest.mark.parametrize("extra", [
    ["--k_sampling=layer", "--moe_stride=1", "--k_max=3"],
    # the router has no gradient in the step's last pass: DDP must still average the first pass's
    ["--width_sampling=fixed", "--fixed_widths=(1.0,0.5)", "--detach_router=True"],
])
def test_ddp_two_processes_equal_one_process(data_dir, tmp_path, extra):
    # 2 gloo processes with 1 micro-batch each see exactly the batches of 1 process with 2 micro-batches
    common = ["--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2", *extra]
    train(data_dir, tmp_path / "single", *common)
    train(data_dir, tmp_path / "ddp", *common, torchrun=True)
    a = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_detach_router_leaves_the_router_to_the_widest_pass(data_dir, tmp_path):
    # one step without clipping: with detach_router the router's update is the full-width pass's alone
    def weights(name, *extra):
        train(data_dir, tmp_path / name, "--max_iters=1", "--eval_interval=1", "--grad_clip=0",
              "--width_sampling=fixed", *extra)
        return torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]
    full = weights("full", "--fixed_widths=(1.0,)")
    detached = weights("detached", "--fixed_widths=(1.0,0.5)", "--detach_router=True")
    both = weights("both", "--fixed_widths=(1.0,0.5)")
    routers = [k for k in full if k.endswith("router.w_g.weight")]
    assert routers and all(torch.equal(full[k], detached[k]) for k in routers)
    assert not all(torch.equal(full[k], both[k]) for k in routers)
    # the narrow pass still trains the experts and the trunk
    assert not torch.equal(full["transformer.wte.weight"], detached["transformer.wte.weight"])


def test_upcycling_a_dense_checkpoint(data_dir, tmp_path):
    dense = ["--n_exp=0", "--expert_hidden=128"]
    train(data_dir, tmp_path / "dense", "--max_iters=40", "--eval_interval=40", *dense)
    dense_val = [r for r in log_rows(tmp_path / "dense") if "val/w=1" in r][-1]["val/w=1"]
    results = {}
    for reorder in (True, False):
        out = tmp_path / f"mose{reorder}"
        train(data_dir, out, "--expert_hidden=128", f"--init_from=upcycle:{tmp_path / 'dense'}",
              f"--upcycle_reorder={reorder}", "--max_iters=0", "--eval_interval=1", "--eval_widths=(1.0,0.5,0.25)")
        results[reorder] = [r for r in log_rows(out) if "val/w=1" in r][0]
    # every expert is a copy of the dense MLP and the gates sum to one: at full width nothing changes
    for r in results.values():
        assert abs(r["val/w=1"] - dense_val) < 1e-5
    # reordering puts the important hidden units first, so the narrow prefixes start better
    assert results[True]["val/w=0.25"] < results[False]["val/w=0.25"]
    p = train(data_dir, tmp_path / "bad", "--expert_hidden=64", f"--init_from=upcycle:{tmp_path / 'dense'}", ok=False)
    assert p.returncode != 0 and "expert_hidden" in p.stderr and "Traceback" not in p.stderr
    # an MoE checkpoint keeps its experts: their number and size must match
    train(data_dir, tmp_path / "moe", "--max_iters=1", "--eval_interval=1", "--width_sampling=none")
    p = train(data_dir, tmp_path / "bad2", "--n_exp=2", "--k_exp=1", f"--init_from=upcycle:{tmp_path / 'moe'}",
              ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "upcycling keeps an MoE layer's experts: n_exp is 4" in p.stderr


@pytest.mark.parametrize("args,message", [
    (["--n_layerz=3"], "unknown config key 'n_layerz'"),
    (["--max_iters=ten"], "--max_iters must be of type int"),
    (["--learning_rate=True"], "--learning_rate must be of type float"),
    (["--width_sampling=random"], "width_sampling must be"),
    (["--w_min=0"], "w_min must be in (0, 1]"),
    (["--eval_widths=(1.0,1.5)"], "eval_widths values must be in (0, 1], got 1.5"),
    (["--width_sampling=fixed", "--fixed_widths=()"], "give at least one"),
    (["--eval_interval=0"], "must be >= 1"),
    (["--width_sampling=random_pair", "--detach_router=True"], "width_sampling='random_pair' has one pass"),
    (["--k_exp=5"], "k_exp must be in [1, n_exp=4]"),
    (["--dataset=nope"], "python prepare_data.py nope"),
    (["config/does_not_exist.py"], "cannot read config file"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--dtype=float64"], "dtype must be auto, float32, bfloat16, float16; got 'float64'"),
    (["--device=tpu"], "device must be auto, cpu, cuda, cuda:N or mps; got 'tpu'"),
    pytest.param(["--device=cuda"], "device 'cuda' is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has cuda")),
])
def test_bad_config_is_one_clear_line(data_dir, tmp_path, args, message):
    p = run(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'empty'}", *TINY, *args, ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
