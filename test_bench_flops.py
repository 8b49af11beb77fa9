"""Tests of bench_flops.py on tiny MoSE / MoE / dense checkpoints trained inside the test."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--n_exp=4", "--k_exp=2", "--expert_hidden=64",
        "--batch_size=8", "--block_size=32", "--eval_iters=1", "--log_interval=5", "--learning_rate=3e-3",
        "--max_iters=40", "--eval_interval=40", "--warmup_iters=5"]
KEYS = {"model", "policy", "width", "k_exp", "gamma", "flops_per_token", "expert_flops_per_token", "rel_flops",
        "val_loss", "val_loss_stderr", "tokens_per_s"}


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoints(char_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for name, extra in (("mose", []), ("moe", ["--width_sampling=none"]), ("dense", ["--n_exp=0"])):
        p = run("train.py", f"--data_dir={char_data}", f"--out_dir={root / name}", *TINY, *extra)
        assert p.returncode == 0, p.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def bench(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "rows.json"
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", f"--compare={checkpoints / 'moe'},{checkpoints / 'dense'}",
            "--quick=True", "--eval_tokens=4096", "--ttt_batches=10", f"--json={path}")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.load(open(path)), p.stdout


def test_rows_and_schema(bench):
    rows, _ = bench
    assert all(KEYS <= set(r) for r in rows)
    by = lambda **kw: [r for r in rows if all(r[k] == v for k, v in kw.items())]
    assert len(by(model="mose", policy="uniform", k_exp=2)) == 2          # the quick width grid: 1.0, 0.5
    assert {r["k_exp"] for r in by(model="mose", width=1.0, policy="uniform")} == {1, 2}
    assert len(by(model="mose", policy="confidence")) == 1 and len(by(model="mose", policy="ttt")) == 1
    assert by(model="moe", policy="uniform") and not by(model="moe", policy="ttt")
    assert len(by(model="dense")) == 1 and by(model="dense")[0]["expert_flops_per_token"] == 0
    for r in rows:
        assert r["val_loss"] > 0 and 0 < r["val_loss_stderr"] < 0.2 and r["tokens_per_s"] > 0
    full = by(model="mose", policy="uniform", width=1.0, k_exp=2)[0]
    assert full["rel_flops"] == 1.0


def test_flops_ordered_by_width_and_k(bench):
    rows, _ = bench
    uni = [r for r in rows if r["model"] == "mose" and r["policy"] == "uniform"]
    at_k2 = sorted((r for r in uni if r["k_exp"] == 2), key=lambda r: r["width"])
    assert all(a["flops_per_token"] < b["flops_per_token"] for a, b in zip(at_k2, at_k2[1:]))
    at_w1 = sorted((r for r in uni if r["width"] == 1.0), key=lambda r: r["k_exp"])
    assert all(a["flops_per_token"] < b["flops_per_token"] for a, b in zip(at_w1, at_w1[1:]))


def test_budgets_are_met(bench):
    rows, _ = bench
    for r in rows:
        if r["policy"] == "ttt":   # fitted on train text, measured on validation text
            assert abs(r["expert_flops_per_token"] / [x for x in rows if x["model"] == "mose" and x["width"] == 1.0
                       and x["k_exp"] == 2][0]["expert_flops_per_token"] / 0.5 - 1) < 0.05


def test_printed_frontier_is_the_non_dominated_set(bench):
    rows, out = bench
    dominated = lambda r: any(o["flops_per_token"] <= r["flops_per_token"] and o["val_loss"] < r["val_loss"]
                              for o in rows)
    expected = sorted(round(r["flops_per_token"] / 1e6, 3) for r in rows if not dominated(r))
    section = out.split("Pareto frontier (all models):")[1].split("\n\n")[0].strip().splitlines()
    printed = sorted(float(line.split()[6]) for line in section)
    assert printed == expected
    assert re.search(r"mose reaches it with|never reaches this loss", out)
    # a saving is a positive percentage, an overspend is named as one ("saves -20 %" would read as a saving)
    assert not re.search(r"saves [+-]", out)
    assert all(re.search(r": (saves|costs) [\d.]+% (more )?of total FLOPs(, (saves|costs) [\d.]+% (more )?of expert "
                         r"FLOPs)?$", line) for line in out.splitlines() if "reaches it with" in line)
    assert "paired over the same" in out
    both = [r for r in rows if r["policy"] == "width_top_p"]   # both dials fitted to the quick budget, 0.5
    assert len(both) == 1 and both[0]["model"] == "mose" and both[0]["budget"] == 0.5
    assert 0.5 <= both[0]["width"] <= 1.0 and both[0]["rel_expert_flops"] < 0.5 * 1.1
    assert re.search(r"budget 0\.50: w [\d.]+ (p [\d.e-]+|all k) \(spent [\d.]+\) [\d.]+ - confidence gamma 2\.00 \(spent [\d.]+\) "
                     r"[\d.]+ = [+-][\d.]+ ± [\d.]+", out), out
    policies = out.split("width policies against uniform width = budget")[1].strip().splitlines()
    assert [line.split()[0] for line in policies[1:3]] == ["confidence", "ttt"]
    assert all(re.search(r"budget 0\.50 \(spent [\d.]+\): [\d.]+ - [\d.]+ = [+-][\d.]+ ± [\d.]+$", line)
               for line in policies[1:3])


def test_top_p_dial(checkpoints, tmp_path):
    # top-p routing as an inference dial, for every model with experts: at p = 1 every one of the (at most) k
    # experts is taken, so the row is the top-k row; at a p below any token's top probability (>= 1/n_exp) each
    # token takes one expert, so it is the top-1 row
    path = tmp_path / "rows.json"
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", f"--compare={checkpoints / 'moe'},{checkpoints / 'dense'}",
            "--quick=True", "--eval_tokens=4096", "--ttt_budgets=()", "--conf_budgets=()", "--route_top_p=0.01,1",
            "--route_top_p_k=2", f"--json={path}")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.load(open(path))
    assert not [r for r in rows if r["model"] == "dense" and r["policy"] == "top_p"]
    for name in ("mose", "moe"):
        for w in (1.0, 0.5):   # full width and the quick grid's width
            top = {r["route_top_p"]: r for r in rows if r["model"] == name and r["policy"] == "top_p"
                   and r["width"] == w}
            k = {r["k_exp"]: r for r in rows if r["model"] == name and r["policy"] == "uniform" and r["width"] == w}
            assert set(top) == {0.01, 1.0} and all(r["k_exp"] == 2 for r in top.values())
            for p_, k_ in ((1.0, 2), (0.01, 1)):
                assert top[p_]["experts_per_token"] == k_ and abs(top[p_]["val_loss"] - k[k_]["val_loss"]) < 1e-6
                assert abs(top[p_]["expert_flops_per_token"] / k[k_]["expert_flops_per_token"] - 1) < 1e-9
    assert "top_p 0.01" in p.stdout


def test_one_operating_point_with_sample_flags(checkpoints, tmp_path):
    # --policy, --budget, --gamma (and --width, --k_exp) add the one point sample.py runs with the same flags: here
    # the very point the quick sweep fits (confidence at gamma 2, budget 0.5), so the two rows are equal
    path = tmp_path / "rows.json"
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", "--quick=True", "--eval_tokens=4096",
            "--ttt_budgets=()", "--both_budgets=()", "--ttt_batches=2", "--policy=confidence", "--gamma=2",
            "--budget=0.5", f"--json={path}")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in json.load(open(path))
            if r["policy"] == "confidence"]
    assert len(rows) == 2 and rows[0] == rows[1] and rows[0]["gamma"] == 2.0 and rows[0]["budget"] == 0.5
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", "--quick=True", "--eval_tokens=4096",
            "--conf_budgets=()", "--ttt_budgets=()", "--both_budgets=()", "--width=0.5", "--k_exp=1", f"--json={path}")
    assert p.returncode == 0, p.stderr[-2000:]
    point = [r for r in json.load(open(path)) if r["policy"] == "per_layer"]
    assert len(point) == 1 and point[0]["width"] == [0.5] and point[0]["k_exp"] == [1]


@pytest.mark.parametrize("args,message", [
    (["--widths=(0.0,)"], "width must be in (0, 1]"),
    (["--route_top_p=0.5,1.5"], "route_top_p is a probability mass in (0, 1], got 1.5"),
    (["--route_top_p=0.5", "--route_top_p_k=9"], "--route_top_p_k=9 is more experts than mose has (n_exp=4)"),
    (["--ttt_budgets=(1.5,)"], "budgets must be in"),
    (["--both_budgets=(1.5,)"], "both_budgets must be in (0, 1]"),
    (["--out_dir=/nonexistent"], "no checkpoint at /nonexistent"),
    (["--policy=ttt"], "policy 'ttt' learns gamma for a FLOPs budget: pass --budget in (0, 1]"),   # sample.py's
    (["--policy=bogus"], "policy must be one of uniform, confidence, ttt, search, allocate, width_top_p; got 'bogus'"),
    (["--width=0.5", "--budget=0.5"], "--width and --budget both set the compute: give one of them"),
    (["--budget=1.5"], "budget must be in (0, 1] (a fraction of full-width expert FLOPs), got 1.5"),
    (["--width=0.5,1,1"], "--width has 3 values but mose has 1 MoE layers"),
    (["--k_exp=9"], "k_exp must be an integer in [1, n_exp=4], got 9"),
    (["--top_ps=(0.5,)"], "unknown config key 'top_ps'"),
    (["--dtype=float64"], "dtype must be auto, float32, bfloat16, float16; got 'float64'"),
    (["--series=out-a,out-b"], "--series takes 'label:dir,dir;label:dir,...'"),
    (["--series=a:out-x;a:out-y"], "--series has two series labelled 'a'"),
    (["--series=a:out-x;b:out-x"], "out-x is in two series ('a', 'b')"),
    (["--lambada_n=-1"], "--lambada_n must be >= 0 (0 = all), got -1"),
])
def test_bad_flags_are_one_clear_line(checkpoints, args, message):
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", *args)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


def test_series_is_one_point_per_model_and_one_line(checkpoints, tmp_path):
    # a family of baselines (e.g. one dedicated MoE per size): each member scored once, as trained; a member that
    # is also in --compare keeps its whole sweep
    path, plot = tmp_path / "rows.json", tmp_path / "curve.png"
    has_plt = importlib.util.find_spec("matplotlib") is not None
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", f"--compare={checkpoints / 'moe'}",
            f"--series=one per size: {checkpoints / 'moe'}, {checkpoints / 'dense'}", "--quick=True",
            "--eval_tokens=4096", "--ttt_batches=2", f"--json={path}", *([f"--plot={plot}"] if has_plt else []))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.load(open(path))
    dense = [r for r in rows if r["model"] == "dense"]
    assert len(dense) == 1 and dense[0]["series"] == "one per size" and dense[0]["width"] == 1.0
    moe = [r for r in rows if r["model"] == "moe"]
    assert len(moe) > 1 and all(r["series"] == "one per size" for r in moe)
    assert all(r["series"] is None for r in rows if r["model"] == "mose")
    assert "mose vs dense" in p.stdout and "mose vs moe" in p.stdout
    if has_plt:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curve_draws_saved_rows_and_refuses_other_files(checkpoints, tmp_path):
    # the rows of a sweep, saved with --json, redrawn by plot_curve.py: two panels, each model's dials as lines,
    # a series as marked points, a dense model as a line; a file that is not such rows is one clear line
    pytest.importorskip("matplotlib")
    rows = tmp_path / "rows.json"
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", f"--compare={checkpoints / 'moe'},{checkpoints / 'dense'}",
            f"--series=one per size: {checkpoints / 'moe'}", "--quick=True", "--eval_tokens=4096", "--ttt_batches=2",
            "--route_top_p=0.6", f"--json={rows}")
    assert p.returncode == 0, p.stderr[-2000:]
    import plot_curve
    lines = plot_curve.lines_of(json.load(open(rows)), "mose")
    assert {"uniform", "confidence", "width_top_p"} <= {policy for policy, _ in lines}
    assert all(len(rs) > 1 for (policy, _), rs in lines.items() if policy == "uniform")
    out = tmp_path / "curve.png"
    p = subprocess.run([sys.executable, "plot_curve.py", str(rows), str(out)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.stderr
    (tmp_path / "bad.json").write_text('{"not": "rows"}')
    p = subprocess.run([sys.executable, "plot_curve.py", str(tmp_path / "bad.json"), str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip().startswith("plot_curve.py: ") and "Traceback" not in p.stderr


def test_plot_or_a_clear_line_without_matplotlib(checkpoints, tmp_path):
    # matplotlib is optional: without it --plot fails before any evaluation, with it the figure is written
    out = tmp_path / "curve.png"
    p = run("bench_flops.py", f"--out_dir={checkpoints / 'mose'}", f"--compare={checkpoints / 'dense'}", "--quick=True",
            "--eval_tokens=4096", "--ttt_batches=2", f"--plot={out}")
    if importlib.util.find_spec("matplotlib") is None:
        assert p.returncode != 0 and p.stderr.strip() == "bench_flops.py: --plot needs matplotlib: pip install matplotlib"
        assert "evaluating on" not in p.stdout
    else:
        assert p.returncode == 0, p.stderr[-2000:]
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in p.stdout


# --- out of domain: --eval_text and --lambada --------------------------------------------------------------------

REPEATED = "the cat sat on the mat. the dog ate the bone. "   # text a tiny model learns in 200 steps
MADE_UP = [   # LAMBADA-style passages on that text: the first one's last word comes out greedily, the second's
              # starts right (" m") and then goes wrong: it must not score
    "the dog ate the bone. the cat sat on the mat",
    "the dog ate the bone. the cat sat on the mud",
]
OOD_TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--batch_size=8", "--block_size=32", "--eval_iters=1",
            "--log_interval=40", "--warmup_iters=5"]


@pytest.fixture(scope="module")
def ood(shared_data, tmp_path_factory):
    """Tiny char models (MoSE and dense) on gutenberg_char, whose vocabulary has a replacement symbol, a tiny
    BPE model, and the out-of-domain files: WikiText's first 20 KB and LAMBADA passages, real and made up."""
    root = tmp_path_factory.mktemp("ood")
    for author, times in (("Author A", 400), ("Author B", 100)):   # two authors: a val split of its own
        (root / "books" / author).mkdir(parents=True)
        (root / "books" / author / f"{author}'s book.txt").write_text(REPEATED * times)
    for name in ("gutenberg_char", "gutenberg"):
        p = run("prepare_data.py", name, f"--input={root / 'books'}", f"--out_dir={root / 'data'}")
        assert p.returncode == 0, p.stderr
    for name, extra in (("mose", ["--dataset=gutenberg_char", "--n_exp=4", "--k_exp=2", "--expert_hidden=64",
                                  "--max_iters=200", "--eval_interval=200", "--learning_rate=1e-2"]),
                        ("dense", ["--dataset=gutenberg_char", "--n_exp=0", "--max_iters=40", "--eval_interval=40",
                                   "--learning_rate=1e-2"]),
                        ("bpe", ["--dataset=gutenberg", "--n_exp=0", "--max_iters=10", "--eval_interval=10"])):
        p = run("train.py", f"--data_dir={root / 'data'}", f"--out_dir={root / name}", *OOD_TINY, *extra)
        assert p.returncode == 0, p.stderr[-2000:]
    (root / "wiki.txt").write_bytes((shared_data / "eval" / "wiki.test.raw").read_bytes()[:20_000])
    real = (shared_data / "eval" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()
    lines = real[:3] + [json.dumps({"text": t}) for t in MADE_UP] + real[3:6]   # 8 lines; --lambada_n=5 takes 5
    (root / "lambada.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def load_model(path):
    import torch
    from model import GPT, GPTConfig
    ckpt = torch.load(path / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def test_eval_text_and_lambada_rows(ood, tmp_path):
    import math
    import torch
    import torch.nn.functional as F
    path = tmp_path / "rows.json"
    p = run("bench_flops.py", f"--out_dir={ood / 'mose'}", f"--compare={ood / 'dense'}", "--quick=True",
            "--eval_tokens=2048", "--ttt_batches=2", "--conf_budgets=()", "--ttt_budgets=()", "--both_budgets=()",
            f"--eval_text={ood / 'wiki.txt'}", "--eval_text_tokens=4096", f"--lambada={ood / 'lambada.jsonl'}",
            "--lambada_n=5", f"--json={path}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "compare char and BPE models in bits per character only" in p.stdout
    assert re.search(r"LAMBADA accuracy: mose - dense = [+-][\d.]+ ± [\d.]+", p.stdout), p.stdout
    rows = json.load(open(path))
    for r in rows:   # every row, every operating point, carries what was scored
        assert r["eval_text"] == str(ood / "wiki.txt") and r["lambada"] == str(ood / "lambada.jsonl")
        assert r["eval_text_nats_per_token"] > 0 and 0 < r["eval_text_nats_stderr"] < 1
        assert r["lambada_passages"] == 5 and 0 <= r["lambada_acc"] <= 1 and r["lambada_nats_per_word"] > 0
        # a char model: one character a token, so bits per character are nats per token over ln 2
        assert abs(r["eval_text_bits_per_char"] - r["eval_text_nats_per_token"] / math.log(2)) < 1e-9
    row = next(r for r in rows if r["model"] == "mose" and r["policy"] == "uniform" and r["width"] == 0.5
               and r["k_exp"] == 2)
    model, ckpt = load_model(ood / "mose")
    meta, T = ckpt["meta"], model.config.block_size
    encode = lambda s: [meta["stoi"].get(c, meta["stoi"][meta["unk"]]) for c in s]
    # --eval_text by hand: the first 4,096 // T non-overlapping windows of the text (line endings made \n)
    ids = torch.tensor(encode((ood / "wiki.txt").read_text(encoding="utf-8").replace("\r\n", "\n")))
    n = 4096 // T
    x, y = ids[:n * T].view(n, T), ids[1:n * T + 1].view(n, T)
    with torch.no_grad():
        nats = F.cross_entropy(model(x, y, width=0.5, k_exp=2).logits.transpose(1, 2), y, reduction="sum").item()
    assert abs(row["eval_text_bits_per_char"] - nats / math.log(2) / (n * T)) < 1e-4
    # validation by hand: 2,048 // T windows spread over all of val.bin (every m-th of its non-overlapping ones), so
    # a split of several books is not scored on its first book alone
    import numpy as np
    val = torch.from_numpy(np.fromfile(ood / "data" / "gutenberg_char" / "val.bin", dtype=np.uint16).astype(np.int64))
    n = 2048 // T
    m = (len(val) - 1) // T // n
    assert m > 1   # the split is longer than the windows scored: they are spread, not the first ones
    starts = torch.arange(n) * m * T
    x, y = torch.stack([val[s:s + T] for s in starts]), torch.stack([val[s + 1:s + 1 + T] for s in starts])
    with torch.no_grad():
        loss = F.cross_entropy(model(x, y, width=0.5, k_exp=2).logits.transpose(1, 2), y).item()
    assert abs(row["val_loss"] - loss) < 1e-4
    # --lambada by hand: greedy decoding, one token at a time, after the context's last T - len(word) + 1 tokens
    passages = [json.loads(line)["text"] for line in (ood / "lambada.jsonl").read_text().splitlines()[:5]]
    hits, word_nats = [], []
    for text in passages:
        cut = text.rfind(" ")
        context, word = encode(text[:cut]), encode(text[cut:])
        seq, hit, total = context[-(T - len(word) + 1):], True, 0.0
        for t in word:
            with torch.no_grad():
                logits = model(torch.tensor([seq]), width=0.5, k_exp=2).logits[0, -1]
            hit &= int(logits.argmax()) == t
            total += -torch.log_softmax(logits, dim=-1)[t].item()
            seq = seq + [t]
        hits.append(hit)
        word_nats.append(total)
    assert hits[3:5] == [True, False]   # the made-up passages: the whole word, and a right start only
    assert row["lambada_acc"] == sum(hits) / 5
    assert abs(row["lambada_nats_per_word"] - sum(word_nats) / 5) < 1e-4


def test_eval_text_bits_per_char_of_a_bpe_model(ood, tmp_path):
    import math
    import tiktoken
    path = tmp_path / "rows.json"
    p = run("bench_flops.py", f"--out_dir={ood / 'bpe'}", "--eval_tokens=256", f"--eval_text={ood / 'wiki.txt'}",
            f"--lambada={ood / 'lambada.jsonl'}", "--lambada_n=5", f"--json={path}")
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = json.load(open(path))
    enc = tiktoken.get_encoding("gpt2")
    ids = enc.encode_ordinary((ood / "wiki.txt").read_text(encoding="utf-8").replace("\r\n", "\n"))
    n = (len(ids) - 1) // 32
    chars = len(enc.decode(ids[:n * 32 + 1])) - len(enc.decode(ids[:1]))   # the characters of the scored tokens
    tokens_per_char = n * 32 / chars
    assert abs(row["eval_text_bits_per_char"] - row["eval_text_nats_per_token"] / math.log(2) * tokens_per_char) < 1e-6
    assert 0 <= row["lambada_acc"] <= 1 and row["lambada_passages"] == 5


@pytest.mark.parametrize("case,message", [
    ("missing", "--eval_text={d}/nothing.txt: no such file"),
    ("empty", "--eval_text={d}/empty.txt is empty"),
    ("not_json", "--lambada={d}/bad.jsonl, line 2: not a JSON object whose \"text\" holds a passage and its last word"),
    ("no_text", "--lambada={d}/bad.jsonl, line 1: not a JSON object whose \"text\" holds a passage"),
    ("unmappable", "has 2 characters outside this char model's vocabulary, e.g. '7', 'é'"),
])
def test_bad_eval_files_are_one_clear_line(ood, checkpoints, tmp_path, case, message):
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "bad.jsonl").write_text({"not_json": '{"text": "a b"}\nnot json\n',
                                         "no_text": '{"passage": "a b"}\n'}.get(case, ""))
    (tmp_path / "odd.txt").write_text("To be, or not to be: 7 cafés.\n" * 20, encoding="utf-8")
    flag = {"missing": f"--eval_text={tmp_path}/nothing.txt", "empty": f"--eval_text={tmp_path}/empty.txt",
            "unmappable": f"--eval_text={tmp_path}/odd.txt"}.get(case, f"--lambada={tmp_path}/bad.jsonl")
    # the Shakespeare model's vocabulary has neither '7' nor 'é', and no replacement symbol
    out_dir = checkpoints / "mose" if case == "unmappable" else ood / "mose"
    p = run("bench_flops.py", f"--out_dir={out_dir}", "--quick=True", "--eval_tokens=2048", flag)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message.format(d=tmp_path) in p.stderr, p.stderr
