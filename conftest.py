"""Shared test fixtures. The read-only test data (Tiny Shakespeare, tiktoken's GPT-2 files) is an input the
tests are given, never a path they guess: NANOMOSE_DATA names the folder (see README), and the tests that need
it skip without it."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def shared_data():
    if "NANOMOSE_DATA" not in os.environ:
        pytest.skip("no test data: set NANOMOSE_DATA to a folder holding tinyshakespeare/input.txt")
    path = pathlib.Path(os.environ["NANOMOSE_DATA"])
    if not (path / "tinyshakespeare" / "input.txt").exists():
        pytest.skip(f"no tinyshakespeare/input.txt under NANOMOSE_DATA={path}")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (path / "tiktoken_cache").exists():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(path / "tiktoken_cache")   # subprocesses inherit it
    return path


@pytest.fixture(scope="session")
def char_data(shared_data, tmp_path_factory):
    """A data_dir with shakespeare_char prepared by prepare_data.py from the shared copy."""
    out = tmp_path_factory.mktemp("data")
    p = subprocess.run([sys.executable, "prepare_data.py", "shakespeare_char", f"--out_dir={out}",
                        f"--input={shared_data / 'tinyshakespeare' / 'input.txt'}"], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    return str(out)
