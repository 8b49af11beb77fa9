"""Tests of training compute (issue: MoSE at equal training compute): the FLOPs train.py counts, a run given
a compute budget instead of a step count, the single-pass recipes (random_step, random_pair) and the held-out
training text that recipes are chosen on. The draws of the recipes themselves: test_recipes.py."""

import json
import math
import os
import pickle
import shutil

import pytest
import torch

from model import GPT, GPTConfig
from test_train import TINY, log_rows, train

# TINY's model as train.py builds it on shakespeare_char (65 characters)
TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=32, n_exp=4, k_exp=2, expert_hidden=64, block_size=32, vocab_size=65)
TOKENS_PER_STEP = 4 * 32   # batch_size x block_size


def moe_step_flops():
    """Forward + backward FLOPs of one full-width step of TINY's model, from the model's own FLOPs count."""
    return 3 * GPT(GPTConfig(**TINY_CONFIG)).flops_per_token() * TOKENS_PER_STEP


# --- train.py: compute counted, compute budgets ----------------------------------------------------------

def test_max_iters_on_the_command_line_wins_over_a_configs_budget(char_data, tmp_path):
    # nanoGPT's habit: python train.py config/... --max_iters=3 runs 3 steps, not the config's 4e13 FLOPs
    p = train(char_data, tmp_path, "config/train_shakespeare_mose.py", *TINY, "--max_iters=3", "--eval_interval=3",
              "--out_dir=" + str(tmp_path))
    assert "--max_iters=3 on the command line wins" in p.stdout
    assert [r["iter"] for r in log_rows(tmp_path) if "loss" in r] == [1, 2, 3]
    assert "random_pair: each (token, expert) pair draws its width, 1 with probability 0.250" in p.stdout


def test_a_compute_budget_replaces_the_step_count(char_data, tmp_path):
    step = moe_step_flops()
    budget = 12 * step
    train(char_data, tmp_path / "moe", f"--max_train_flops={budget}", "--width_sampling=none", "--eval_interval=100",
          "--lr_decay_iters=0")
    rows = [r for r in log_rows(tmp_path / "moe") if "loss" in r]
    # a plain MoE step costs exactly one clock unit: 12 steps, and the FLOPs counted are 12 steps' worth
    assert [r["iter"] for r in rows] == list(range(1, 13))
    assert math.isclose(rows[-1]["train_flops"], budget, rel_tol=1e-9)
    assert rows[-1]["train_tokens"] == 12 * TOKENS_PER_STEP
    lrs = [r["lr"] for r in rows]
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < 2e-3   # cosine over the budget, after warmup
    ckpt = torch.load(tmp_path / "moe" / "ckpt.pt", weights_only=True)
    assert ckpt["train_flops"] == rows[-1]["train_flops"] and ckpt["train_tokens"] == 12 * TOKENS_PER_STEP

    # MoSE's full + random width costs more per step: the same budget buys fewer steps, and ends within a step
    train(char_data, tmp_path / "mose", f"--max_train_flops={budget}", "--width_sampling=max_random",
          "--width_data=fresh", "--eval_interval=100", "--width_grid=0", "--width_mix=()")   # never snapped to 1
    rows = [r for r in log_rows(tmp_path / "mose") if "loss" in r]
    assert 6 <= len(rows) < 12
    assert budget <= rows[-1]["train_flops"] < budget + 2 * step
    assert rows[-2]["train_flops"] < budget
    assert rows[-1]["train_tokens"] == 2 * len(rows) * TOKENS_PER_STEP   # 'fresh': each width its own batch
    per_step = [b["train_flops"] - a["train_flops"] for a, b in zip(rows, rows[1:])]
    assert all(step < s < 2 * step for s in per_step)                    # full width + a narrower one


def test_compute_survives_resume(char_data, tmp_path):
    common = ["--width_sampling=random_pair", "--width_grid=0.25", "--always_save_checkpoint=True", "--eval_interval=3",
              "--lr_decay_iters=6"]
    train(char_data, tmp_path / "a", "--max_iters=6", *common)
    train(char_data, tmp_path / "b", "--max_iters=3", *common)
    train(char_data, tmp_path / "b", "--max_iters=6", "--init_from=resume", *common)
    last = lambda d: [r for r in log_rows(d) if "loss" in r][-1]
    a, b = last(tmp_path / "a"), last(tmp_path / "b")
    assert a["iter"] == b["iter"] == 6 and a["train_flops"] == b["train_flops"] and a["loss"] == b["loss"]


# --- the single-pass recipes -------------------------------------------------------------------------------

def test_random_pair_trains_one_cheaper_pass_per_step(char_data, tmp_path):
    train(char_data, tmp_path, "--max_iters=5", "--eval_interval=5", "--width_sampling=random_pair", "--p_full=0.5",
          "--width_grid=0.25", "--width_mix=()", "--p_sequence=0")
    rows = [r for r in log_rows(tmp_path) if "loss" in r]
    assert all(r["widths"] == ["RandomWidth(p_full=0.5, w_min=0.25, grid=0.25)"] for r in rows)
    per_step = [b["train_flops"] - a["train_flops"] for a, b in zip(rows, rows[1:])]
    step = moe_step_flops()
    assert all(0.5 * step < s < step for s in per_step)   # about 0.8125 of the experts' FLOPs, rest unchanged
    assert rows[-1]["train_tokens"] == 5 * TOKENS_PER_STEP


def test_random_pair_with_distillation_adds_a_full_width_teacher_pass(char_data, tmp_path):
    train(char_data, tmp_path, "--max_iters=3", "--eval_interval=3", "--width_sampling=random_pair", "--p_full=0.5",
          "--width_grid=0.25", "--width_mix=()", "--p_sequence=0", "--distill_weight=1.0")
    rows = [r for r in log_rows(tmp_path) if "loss" in r]
    assert all(r["widths"] == [1.0, "RandomWidth(p_full=0.5, w_min=0.25, grid=0.25)"] for r in rows)
    per_step = [b["train_flops"] - a["train_flops"] for a, b in zip(rows, rows[1:])]
    step = moe_step_flops()
    assert all(1.5 * step < s < 2 * step for s in per_step)   # the teacher's full step plus the cheaper pass


@pytest.mark.parametrize("keys", [
    dict(width_mix=(0.3, 0.1, 0.2, 0.4), p_sequence=0.5),
    dict(width_mix=(0.3, 0.1, 0.2, 0.4), p_sequence=0.5, distill_weight=1.0),   # + a full-width teacher pass
    dict(width_mix=(), p_sequence=1.0, distill_weight=0.5),                      # the snapped p_full law
    dict(),                                                                      # the shipped recipe
])
def test_random_pair_counts_the_flops_its_drawn_widths_spend(char_data, tmp_path, keys):
    # train.py's train_flops, step by step, against the FLOPs the recipe's draws spend, recomputed here from the
    # draws alone: each step's RandomWidth as width_of gives it (its seed, step, micro-batch and sequence length),
    # in both MoE layers, h(w) hidden units per pair, 4 C h FLOPs each; the teacher's pass at full width
    from model import hidden_units, pair_flops
    from recipes import RandomWidth, width_of
    from test_recipes import recipe
    train(char_data, tmp_path, "--max_iters=4", "--eval_interval=4", "--width_sampling=random_pair", "--moe_stride=1",
          *(f"--{key}={value}" for key, value in keys.items()))
    rows = [r for r in log_rows(tmp_path) if "loss" in r]
    model = GPT(GPTConfig(**TINY_CONFIG, moe_stride=1))                   # 2 MoE layers
    r = recipe(model=model.config, **keys)
    pair = RandomWidth(r.p_full, r.w_min, r.width_grid, width_mix=r.width_mix, p_sequence=r.p_sequence)
    C, H, k, N = 32, 64, 2, TOKENS_PER_STEP
    full = model.non_expert_flops + 2 * k * pair_flops(C, H)               # per token, both MoE layers
    expected = 0.0
    for step, row in enumerate(rows):
        policy = width_of(r, pair, step, 0, seq_len=32)
        spent = sum(pair_flops(C, hidden_units(policy(torch.zeros(N, k), i), H).sum(dim=1).float()) for i in range(2))
        expected += 3 * N * ((model.non_expert_flops + spent.mean().item()) + (full if r.distill_weight else 0))
        assert math.isclose(row["train_flops"], expected, rel_tol=1e-6), (step, row["train_flops"], expected)
    assert rows[0]["widths"][-1] == repr(pair) and len(rows[0]["widths"]) == 1 + (r.distill_weight > 0)


@pytest.mark.parametrize("p_full,check", [
    (1.0, lambda w: w == [1.0]),
    (0.0, lambda w: len(w) == 1 and 0.25 <= w[0] < 1.0),
])
def test_random_step_draws_one_width_per_step(char_data, tmp_path, p_full, check):
    train(char_data, tmp_path, "--max_iters=4", "--eval_interval=4", "--width_sampling=random_step",
          f"--p_full={p_full}", "--width_grid=0", "--width_mix=()")
    rows = [r for r in log_rows(tmp_path) if "widths" in r]
    assert len(rows) == 4 and all(check(r["widths"]) for r in rows), rows


# --- held-out training text --------------------------------------------------------------------------------

def test_holdout_is_evaluated_and_bad_values_are_one_line(char_data, tmp_path):
    train(char_data, tmp_path, "--max_iters=2", "--eval_interval=2", "--holdout_tokens=5000")
    evals = [r for r in log_rows(tmp_path) if "val/w=1" in r]
    assert all("holdout/w=1" in r and "holdout/w=0.5" in r for r in evals)
    assert evals[-1]["holdout/w=1"] != evals[-1]["val/w=1"]
    for bad, message in [("--holdout_tokens=32", "holdout_tokens (32) must exceed block_size (32)"),
                         ("--holdout_tokens=2000000", "after holding out 2000000"),
                         ("--p_sequence=1.5", "--p_sequence must be a share of sequences in [0, 1], got 1.5"),
                         ("--max_train_flops=-1", "--max_train_flops must be >= 0")]:
        p = train(char_data, tmp_path / "bad", bad, ok=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert message in p.stderr, p.stderr


def authors_data(char_data, tmp_path, tail):
    """A data_dir with shakespeare_char as prepared (no authors), and 'books': the same text, but its meta.pkl
    lists made-up authors of train.bin, the last ones with `tail` tokens, as prepare_data.py gutenberg_char lists
    the real ones."""
    src, dst = os.path.join(char_data, "shakespeare_char"), tmp_path / "data" / "books"
    shutil.copytree(src, tmp_path / "data" / "shakespeare_char")
    shutil.copytree(src, dst)
    meta = pickle.load(open(os.path.join(src, "meta.pkl"), "rb"))
    n = os.path.getsize(dst / "train.bin") // 2
    meta["train_authors"] = [("A", n - sum(tail))] + [(chr(ord("B") + i), t) for i, t in enumerate(tail)]
    pickle.dump(meta, open(dst / "meta.pkl", "wb"))
    return str(tmp_path / "data")


def test_holdout_authors_holds_out_their_tokens(char_data, tmp_path):
    # the last 2 authors are the last 1,000 + 2,000 tokens: the run is the one with --holdout_tokens=3000, bit for bit
    data = authors_data(char_data, tmp_path, [1000, 2000])
    common = ["--dataset=books", "--max_iters=3", "--eval_interval=3"]
    p = train(data, tmp_path / "authors", *common, "--holdout_authors=2")
    assert "holding out the last 2 authors of train.bin (B; C): 3,000 tokens" in p.stdout
    train(data, tmp_path / "tokens", *common, "--holdout_tokens=3000")
    assert log_rows(tmp_path / "authors") == log_rows(tmp_path / "tokens")
    assert "holdout/w=1" in log_rows(tmp_path / "authors")[-1]
    ckpt = torch.load(tmp_path / "authors" / "ckpt.pt", weights_only=True)   # what sample.py and bench_flops.py read
    assert ckpt["config"]["holdout_tokens"] == 3000 and ckpt["config"]["holdout_authors"] == 2
    for dataset, bad, message in [
            ("books", "--holdout_authors=3", "must leave an author to train on: train.bin has 3, got 3"),
            ("books", "--holdout_tokens=100", "holdout_tokens and holdout_authors both hold out the tail of train.bin"),
            ("shakespeare_char", "--holdout_authors=1", "meta.pkl lists none that add up to it")]:   # no authors
        p = train(data, tmp_path / "bad", f"--dataset={dataset}", "--holdout_authors=1", bad, ok=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert message in p.stderr, p.stderr


def test_the_gutenberg_configs_holdout_is_the_shared_copys_last_3_authors(shared_data, tmp_path):
    # config/train_gutenberg_mose.py's holdout_authors = 3, on the shared 468-book copy, holds out the 3,416,395
    # tokens its holdout_tokens held out before (Zola, Hardy, Homer)
    import subprocess
    import sys
    if not (shared_data / "gutenberg").is_dir():
        pytest.skip(f"no gutenberg/ under NANOMOSE_DATA={shared_data}")
    p = subprocess.run([sys.executable, "prepare_data.py", "gutenberg_char", f"--input={shared_data / 'gutenberg'}",
                        f"--out_dir={tmp_path}"], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    p = train(str(tmp_path), tmp_path / "out", "config/train_gutenberg_mose.py", *TINY, f"--out_dir={tmp_path / 'out'}",
              "--eval_only=True")
    assert "holding out the last 3 authors of train.bin (Zola, Emile; Hardy, Thomas; Homer): 3,416,395 tokens" \
        in p.stdout, p.stdout[-2000:]


def test_the_gutenberg_configs_train_and_their_comments_state_their_numbers(char_data, tmp_path):
    # each config trains as written (its shape, recipe and rate; a tiny run on Shakespeare's characters), and the
    # FLOPs per token and step counts its comments state are what the model and the budget give (vocabulary 211)
    import re
    from recipes import RandomWidth
    text = {n: open(f"config/train_gutenberg_{n}.py").read().replace(",", "") for n in ("mose", "moe", "dense")}
    for name in text:
        p = train(char_data, tmp_path / name, f"config/train_gutenberg_{name}.py", "--dataset=shakespeare_char",
                  "--holdout_authors=0", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=2",
                  f"--out_dir={tmp_path / name}")
        cfg = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["config"]
        assert (cfg["n_embd"], cfg["n_head"], cfg["moe_stride"], cfg["learning_rate"]) == (32, 2, 1, 4e-3), cfg
        assert cfg["n_exp"] == (0 if name == "dense" else 8) and cfg["max_iters"] == 2, cfg
        assert name == "dense" or cfg["width_sampling"] == {"mose": "random_pair", "moe": "none"}[name], cfg
    v = {}
    exec("exec(open('config/train_gutenberg_mose.py').read())", {}, v)
    shape = dict(vocab_size=211, block_size=v["block_size"], n_layer=v["n_layer"], n_head=v["n_head"],
                 n_embd=v["n_embd"], n_exp=v["n_exp"], k_exp=v["k_exp"], moe_stride=v["moe_stride"], bias=False)
    n_steps = lambda f, budget=v["max_train_flops"]: round(budget / (3 * f * v["batch_size"] * v["block_size"]))
    steps = lambda f: f"{n_steps(f)} steps"
    flops = {H: GPT(GPTConfig(**shape, expert_hidden=H)).flops_breakdown() for H in (128, 96, 64, 32)}
    r = RandomWidth(w_min=v["w_min"], grid=v["width_grid"], width_mix=v["width_mix"])
    frac = sum(p * w for w, p in r.mix().items())                                    # 0.625: h(w) / H exact here
    mose = flops[128]["non_expert"] + frac * flops[128]["experts"]
    dense = GPT(GPTConfig(**dict(shape, n_exp=0))).flops_per_token()
    assert f"{mose / 1e3:.1f}k for a mean step of the shipped" in text["mose"] and f"mean {frac:.3f} of the" in text["mose"]
    assert f"{flops[128]['total'] / 1e3:.1f}k for the MoE at full width" in text["mose"]
    assert " / ".join(f"{flops[H]['total'] / 1e3:.1f}k" for H in (96, 64, 32)) in text["mose"]
    assert re.search(f"MoSE +{steps(mose)}", text["mose"])
    assert re.search(f"plain MoE +{steps(flops[128]['total'])}", text["mose"])
    assert f"{steps(flops[128]['total'])}" in text["moe"] and f"{steps(dense)}" in text["dense"]
    assert " / ".join(str(n_steps(flops[H]["total"])) for H in (96, 64, 32)) in text["mose"]
    quarter = [str(n_steps(flops[H]["total"], v["max_train_flops"] / 4)) for H in (128, 96, 64, 32)]
    assert f"({' / '.join(quarter)} steps)" in text["moe"]


# --- bench_flops.py: training compute beside the rows, recipes scored on held-out training text -----------

def test_bench_reports_training_flops_and_scores_the_holdout(char_data, tmp_path):
    import subprocess
    import sys
    for name, extra in (("mose", ["--width_sampling=random_pair", "--width_grid=0.25"]),
                        ("moe", ["--width_sampling=none"])):
        train(char_data, tmp_path / name, "--max_iters=4", "--eval_interval=4", "--holdout_tokens=3000", *extra)
    bench = lambda *a: subprocess.run([sys.executable, "bench_flops.py", f"--out_dir={tmp_path / 'mose'}", *a,
                                       "--quick=True", "--eval_tokens=2048", "--ttt_batches=2"],
                                      cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    p = bench(f"--compare={tmp_path / 'moe'}", "--split=holdout", f"--json={tmp_path / 'rows.json'}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held-out training tokens" in p.stdout
    ckpts = {n: torch.load(tmp_path / n / "ckpt.pt", weights_only=True) for n in ("mose", "moe")}
    rows = json.load(open(tmp_path / "rows.json"))
    assert {r["model"]: r["train_flops"] for r in rows} == {n: c["train_flops"] for n, c in ckpts.items()}
    assert f"moe: trained 4 steps, 512 tokens, {ckpts['moe']['train_flops']:.4e} FLOPs" in p.stdout
    # the holdout is other text than val: the same model scores differently on it
    val = bench("--split=val", f"--json={tmp_path / 'val.json'}")
    assert val.returncode == 0, val.stderr[-3000:]
    loss = lambda rs: next(r["val_loss"] for r in rs if r["model"] == "mose" and r["width"] == 1.0 and r["k_exp"] == 2)
    assert loss(json.load(open(tmp_path / "val.json"))) != loss(rows)
    # a model trained without a holdout cannot be scored on one
    train(char_data, tmp_path / "plain", "--max_iters=2", "--eval_interval=2")
    p = bench(f"--compare={tmp_path / 'plain'}", "--split=holdout")
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "--split=holdout needs every model trained with the same --holdout_tokens" in p.stderr


# --- plot_budget.py: the gaps between sizes, and between MoSE and the model trained for a width, per budget ----

def test_plot_budget_gaps_are_the_runs_own_losses(char_data, tmp_path):
    # two budgets, each with the MoE (h = 64), the half-size MoE (h = 32, two seeds at the small budget) and
    # MoSE: every gap printed is a difference of the losses the runs logged, seeds averaged
    import subprocess
    import sys
    runs = {(2e9, "moe"): ["--width_sampling=none"], (2e9, "half"): ["--width_sampling=none", "--expert_hidden=32"],
            (2e9, "half-s7"): ["--width_sampling=none", "--expert_hidden=32", "--seed=7"], (2e9, "mose"): [],
            (4e9, "moe"): ["--width_sampling=none"], (4e9, "half"): ["--width_sampling=none", "--expert_hidden=32"],
            (4e9, "mose"): []}
    for (budget, name), extra in runs.items():
        train(char_data, tmp_path / f"{budget:g}-{name}", f"--max_train_flops={budget:g}", "--eval_interval=1000",
              "--holdout_tokens=3000", "--eval_k=()", *extra)
    last = lambda d, w: [r for r in log_rows(tmp_path / d) if "holdout/w=1" in r][-1][f"holdout/w={w:g}"]
    import plot_budget
    table = plot_budget.gaps([plot_budget.read_run(tmp_path / f"{b:g}-{n}", "holdout") for b, n in runs])
    assert sorted(table) == [2e9, 4e9] and sorted(table[2e9]) == [0.25, 0.5, 0.75, 1.0]
    half = (last("2e+09-half", 1) + last("2e+09-half-s7", 1)) / 2
    assert table[2e9][0.5]["width_pays"] == pytest.approx(half - last("2e+09-moe", 1))
    assert table[2e9][0.5]["mose_gap"] == pytest.approx(last("2e+09-mose", 0.5) - half)
    assert table[2e9][0.5]["dedicated"][1:] == (pytest.approx(abs(last("2e+09-half", 1) - last("2e+09-half-s7", 1))), 2)
    assert table[2e9][1.0]["width_pays"] is None   # MoSE's full width against the plain MoE
    assert table[2e9][1.0]["mose_gap"] == pytest.approx(last("2e+09-mose", 1) - last("2e+09-moe", 1))
    assert table[4e9][0.5]["mose_gap"] == pytest.approx(last("4e+09-mose", 0.5) - last("4e+09-half", 1))
    assert table[4e9][0.25]["mose_gap"] is None and table[4e9][0.25]["mose"][0] == pytest.approx(last("4e+09-mose", 0.25))
    # a run from an older commit lacks the keys that came later (their defaults kept its behaviour): still a seed
    shutil.copytree(tmp_path / "2e+09-half-s7", tmp_path / "older")
    ckpt = torch.load(tmp_path / "older" / "ckpt.pt", weights_only=True)
    del ckpt["config"]["p_sequence"], ckpt["config"]["holdout_authors"]
    torch.save(ckpt, tmp_path / "older" / "ckpt.pt")
    older = plot_budget.gaps([plot_budget.read_run(tmp_path / d, "holdout") for d in ("2e+09-moe", "2e+09-half", "older")])
    assert older[2e9][0.5]["dedicated"][2] == 2
    script = lambda *a: subprocess.run([sys.executable, "plot_budget.py", *map(str, a)], capture_output=True, text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__)))
    import importlib.util
    plot = [f"--plot={tmp_path / 'budget.png'}"] if importlib.util.find_spec("matplotlib") else []
    p = script(*(tmp_path / f"{b:g}-{n}" for b, n in runs), *plot)
    assert p.returncode == 0, p.stderr
    assert not plot or (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = next(line.split() for line in p.stdout.splitlines() if line.startswith("2.00e+09   0.5"))
    assert row[-2:] == [f"{table[2e9][0.5]['width_pays']:+.4f}", f"{table[2e9][0.5]['mose_gap']:+.4f}"]
    # a folder that is no run, a run stopped before its budget, two runs that are not seeds of one recipe (their
    # mean would hide a difference), bad flags: one clear line each
    log = (tmp_path / "4e+09-moe" / "log.jsonl").read_text().splitlines()
    shutil.copytree(tmp_path / "4e+09-moe", tmp_path / "cut")
    (tmp_path / "cut" / "log.jsonl").write_text("\n".join(line for line in log if json.loads(line)["iter"] == 0))
    train(char_data, tmp_path / "other-rate", "--max_train_flops=4e9", "--eval_interval=1000", "--holdout_tokens=3000",
          "--eval_k=()", "--width_sampling=none", "--learning_rate=1e-3")
    for args, message in (((tmp_path,), "is not a train.py run"), ((tmp_path / "cut",), "finish it"),
                          ((tmp_path / "4e+09-moe", tmp_path / "other-rate"), "differ in learning_rate, not only in seed"), ((tmp_path / "4e+09-moe", "--split=hold"), "usage"),
                          ((tmp_path / "4e+09-moe", "--splt=val"), "--splt=val is not one of these")):
        p = script(*args)
        assert p.returncode != 0 and "Traceback" not in p.stderr and message in p.stderr, p.stderr
