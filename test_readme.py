"""The README's quick start, run as written (with tiny overrides appended), so the README cannot drift from the
code: every `python ...` line in the fenced blocks of its "quick start" section is executed in order."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
# appended to each script's command: a tiny model and a short run, data and outputs in the test's folder
TINY_TRAIN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--expert_hidden=64", "--batch_size=4", "--block_size=32",
              "--max_train_flops=3e9", "--eval_interval=5", "--eval_iters=2", "--log_interval=5"]


def quick_start_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    section = re.search(r"^## quick start.*?$(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## quick start' section"
    # the commands' blocks: fences without a language (```text blocks show what the commands print)
    blocks = [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", section.group(1), re.S | re.M) if not lang]
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("python ")]


def test_quick_start_runs_as_written(char_data, shared_data, tmp_path):
    commands = quick_start_commands()
    scripts = [shlex.split(c)[1] for c in commands]
    assert {"prepare_data.py", "train.py", "sample.py", "bench_flops.py"} <= set(scripts), commands
    for command in commands:
        # outputs go to the test's folder: out-* directories and plot files are rewritten to live there
        argv = [a.replace("out-", f"{tmp_path}/out-") for a in shlex.split(command)]
        argv = [f"--plot={tmp_path}/{a.split('=', 1)[1]}" if a.startswith("--plot=") else a for a in argv]
        if importlib.util.find_spec("matplotlib") is None:   # optional: the plot is skipped, the sweep still runs
            argv = [a for a in argv if not a.startswith("--plot=")]
        script = argv[1]
        if script == "prepare_data.py":
            argv += [f"--input={shared_data / 'tinyshakespeare' / 'input.txt'}", f"--out_dir={tmp_path / 'data'}"]
        elif script == "train.py":   # the config names its out_dir: put it in the test's folder too
            out_dir = re.search(r"^out_dir = '(.+)'$", open(os.path.join(REPO, argv[2])).read(), re.M).group(1)
            argv += [f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / out_dir}", *TINY_TRAIN]
        elif script == "sample.py":
            argv += ["--num_samples=1", "--max_new_tokens=20", "--ttt_batches=2"]
        elif script == "bench_flops.py":
            argv += ["--quick=True", "--eval_tokens=2048", "--ttt_batches=2"]
        p = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, f"README command failed: {command}\n{p.stdout[-1500:]}\n{p.stderr[-2500:]}"
