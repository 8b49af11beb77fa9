"""Tests of show_widths.py and sample.py --show_widths / --html: which widths a token gets (against one
teacher-forced pass), the terminal's colours and plain markers, the HTML page, every policy end to end on a tiny
checkpoint, and the page as a browser draws it (headless chromium; skipped where there is none)."""

import os
import pathlib
import pty
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
import torch

import show_widths as sw
from model import GPT, ConfidenceWidth, GPTConfig
from test_sample import char_data, write_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32
TINY = dict(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, n_exp=4, k_exp=2, expert_hidden=64, moe_stride=1)
MARK = re.compile(r"⟨(-|\d\.\d\d)⟩")
PROMPT = "The king:\nWhat say"   # characters that the stand-in text of test_sample.make_text has too


@pytest.fixture(scope="module")
def ckpt(request, tmp_path_factory):
    """A MoSE checkpoint with two MoE layers (so per-layer dials and --width_layer mean something)."""
    root = tmp_path_factory.mktemp("widths")
    meta, train = char_data(request, root)
    torch.manual_seed(0)
    write_checkpoint(root / "mose", GPT(GPTConfig(**TINY, vocab_size=meta["vocab_size"])), meta, root / "data", 20,
                     train, (None, 0.5))
    return root / "mose"


def sample(ckpt, *args, env=None, tty=False):
    """sample.py's stdout: piped, or (tty=True) through a pseudo-terminal, as a person's shell would run it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "sample.py", f"--out_dir={ckpt}", "--num_samples=1", "--max_new_tokens=40",
           f"--start={PROMPT}", *args]
    if not tty:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    return out.decode("utf-8").replace("\r\n", "\n")


# -----------------------------------------------------------------------------
# which widths a token gets


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("top_p", [None, 0.6])
def test_pairs_are_those_of_the_pass_that_read_each_token(use_cache, top_p):
    # one teacher-forced pass over the generated text reads every token as decoding did: the same widths and
    # experts at every position, with or without the KV cache; the last token, never read, has none
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, vocab_size=40)).eval()
    policy = ConfidenceWidth(gamma=20.0, Gamma=0.3)     # sharp: the widths differ from token to token
    prompt = torch.randint(40, (1, 5))
    with sw.recording(model) as rec:
        y, _ = model.generate(prompt, 20, width=policy, use_cache=use_cache, route_top_p=top_p, trace=rec.trace)
    pairs = rec.pairs(y.size(1))
    with torch.no_grad():
        ref = model(y[:, :-1], y[:, 1:], width=policy, route_top_p=top_p).stats   # targets: every position's stats
    assert pairs[-1] is None and all(p is not None for p in pairs[:-1])
    for t, p in enumerate(pairs[:-1]):
        for m, layer_pairs in enumerate(p):
            assert [e for e, _, _ in layer_pairs] == ref["experts"][m][0, t].tolist()
            assert [w for _, w, _ in layer_pairs] == pytest.approx(ref["ran_width"][m][0, t].tolist())
            gates = [g for _, _, g in layer_pairs]
            assert sum(gates) == pytest.approx(1, abs=1e-5)
            if top_p:   # a skipped pair has width 0 and gate 0
                assert all((w == 0) == (g == 0) for _, w, g in layer_pairs)
    assert len({round(sw.token_width(p), 4) for p in pairs[:-1]}) > 1


def test_window_slides_and_old_prompt_tokens_have_no_width():
    # a prompt longer than block_size: the first pass reads only its last block_size tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, vocab_size=40)).eval()
    with sw.recording(model) as rec:
        y, _ = model.generate(torch.randint(40, (1, BLOCK + 3)), 6, width=0.5, trace=rec.trace)
    pairs = rec.pairs(y.size(1))
    assert [p is None for p in pairs] == [True] * 3 + [False] * (BLOCK + 5) + [True]
    assert all(sw.token_width(p) == 0.5 for p in pairs[3:-1])


def test_token_width_counts_only_pairs_that_ran():
    pairs = [[(0, 0.5, 0.8), (3, 0.0, 0.0)],      # top-p skipped the second pair: it does not count
             [(1, 1.0, 0.6), (2, 0.5, 0.4)]]
    assert sw.token_width(pairs) == pytest.approx((0.5 + 0.75) / 2)     # each layer's mean, averaged
    assert sw.token_width(pairs, layer=0) == 0.5 and sw.token_width(pairs, layer=1) == 0.75
    assert sw.token_compute(pairs) == pytest.approx(2.0 / 4)            # the FLOPs do count the skipped pair as 0
    assert sw.token_width(None) is None
    # --color_by=top: the most probable expert's width (the first pair), per layer, averaged
    assert sw.token_width(pairs, by="top") == pytest.approx((0.5 + 1.0) / 2)
    assert sw.token_width([[(0, 0.75, 0.9), (3, 0.25, 0.1)]], by="top") == 0.75


# -----------------------------------------------------------------------------
# the terminal and the page, drawn from known widths


def known(widths):
    """One MoE layer, k = 2, both pairs at the given width (None: no width)."""
    return [None if w is None else [[(0, w, 0.6), (1, w, 0.4)]] for w in widths]


class FakeTTY:
    def isatty(self):
        return True


def test_terminal_colours_and_plain_markers(monkeypatch):
    pieces, pairs = ["A", ":", "\n", "b", "c"], known([0.25, 0.25, 1.0, 0.5, None])
    true24 = sw.terminal(pieces, pairs, 2, color=True, truecolor=True)
    assert "\x1b[48;2;%d;%d;%d" % sw.colour(0.25) in true24 and "\x1b[48;2;%d;%d;%d" % sw.colour(1.0) in true24
    assert "\x1b[4m" in true24 and "↵" in true24 and true24.endswith("c")   # prompt underlined; last uncoloured
    assert "\x1b[48;5;" in sw.terminal(pieces, pairs, 2, color=True)
    plain = sw.terminal(pieces, pairs, 2)
    assert plain == "⟦A⟨0.25⟩:⟨0.25⟩⟧↵⟨1.00⟩\nb⟨0.50⟩c⟨-⟩" and "\x1b" not in plain
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLORTERM", "truecolor")
    assert sw.terminal_colours(FakeTTY()) == (True, True)
    monkeypatch.setenv("NO_COLOR", "1")                                     # no-color.org
    assert sw.terminal_colours(FakeTTY())[0] is False
    monkeypatch.delenv("NO_COLOR")
    assert sw.terminal_colours(open(os.devnull, "w"))[0] is False            # not a terminal
    uniform = sw.legend([known([0.5, 0.5, None])], 1, color=True, point="policy uniform")
    assert "one colour everywhere: every token ran at width 0.50" in uniform and "operating point:" in uniform


def test_html_page_is_escaped_and_self_contained():
    pieces = ["<b>", " & ", "\n", '"q"', "  x"]
    page = sw.page([dict(pieces=pieces, pairs=known([0.25, 1.0, 0.5, 0.5, None]), n_prompt=1, spent="spent 1 X")],
                   1, point="policy <p>", reference="ref")
    assert "<b>" not in page.split("<body>")[1].replace("<b>operating", "").replace("<b>reference", "") \
        .replace("<b>sample", "")
    assert "&lt;b&gt;" in page and " &amp; " in page and '<span class="nl"></span>\n' in page and "  x</span>" in page
    assert "policy &lt;p&gt;" in page and "spent 1 X" in page
    assert not re.search(r"<script|<link|src=|url\(|@import|https?:", page)
    titles = re.findall(r'title="([^"]*)"', page)
    assert len(titles) == 5 and "MoE layer 0: expert 0 at 0.25, gate 0.60; expert 1 at 0.25, gate 0.40" in titles[0]
    assert "&#10;" in titles[0] and "never read" in titles[-1]
    assert page.count('class="p"') == 1 and 'class="none"' in page


# -----------------------------------------------------------------------------
# sample.py end to end


@pytest.mark.parametrize("args", [
    ["--width=0.5,1.0", "--width_layer=0", "--use_cache=False"],       # uniform, a width per MoE layer
    ["--policy=confidence", "--gamma=20", "--width=0.3", "--use_cache=False"],
    ["--policy=ttt", "--budget=0.5", "--ttt_batches=2"],
    ["--policy=search", "--budget=0.5", "--ttt_batches=2"],
    ["--policy=allocate", "--budget=0.5", "--ttt_batches=2"],
    ["--policy=width_top_p", "--budget=0.4", "--ttt_batches=2"],
    ["--width=0.5", "--route_top_p=0.5"],                              # top-p routing by hand
], ids=["uniform", "confidence", "ttt", "search", "allocate", "width_top_p", "top_p"])
def test_every_policy_shows_its_widths(ckpt, tmp_path, args):
    page = tmp_path / "widths.html"
    out = sample(ckpt, "--show_widths=True", f"--html={page}", *args)
    assert "\x1b" not in out                                  # piped: plain text, a marker per token
    text = out.split("operating point:", 1)[1].split("\n", 1)[1]     # after the line before the sample
    marks = MARK.findall(text.split("\nwidths: each token is followed by ⟨w⟩")[0])
    assert len(marks) == len(PROMPT) + 40 and marks[-1] == "-" and "-" not in marks[:-1]
    assert text.startswith("⟦T⟨") and re.search(r":⟨\d\.\d\d⟩↵⟨\d\.\d\d⟩\nW⟨\d\.\d\d⟩h.*y⟨\d\.\d\d⟩⟧", text)
    assert "operating point: policy" in text and re.search(r"spent [\d.]+ MFLOPs/token", text)
    widths = {float(m) for m in marks[:-1]}
    if "--width_layer=0" in args:
        assert widths == {0.5} and "one colour everywhere: every token ran at width 0.50" in text
        assert "in MoE layer 0" in text
    if "--route_top_p=0.5" in args:   # a skipped pair does not count: every token's experts ran at 0.5
        assert widths == {0.5} and "skipped by top-p routing" in text
    if "--policy=confidence" in args:
        assert len(widths) > 1
    html = page.read_text(encoding="utf-8")
    assert html.count("<span ") - html.count('<span class="nl">') == len(marks) and "operating point:" in html


def test_a_terminal_gets_colours_unless_no_color(ckpt):
    coloured = sample(ckpt, "--show_widths=True", "--width=0.5", tty=True, env={"COLORTERM": "truecolor",
                                                                                  "TERM": "xterm-256color"})
    assert "\x1b[48;2;%d;%d;%d;" % sw.colour(0.5) in coloured and "width scale, narrow to wide" in coloured
    plain = sample(ckpt, "--show_widths=True", "--width=0.5", tty=True, env={"NO_COLOR": "1"})
    assert "\x1b" not in plain and "⟨0.50⟩" in plain


def test_color_by_top_shows_the_routers_confidence(ckpt, tmp_path):
    # the confidence policy shares k * Gamma among a token's experts: their mean stays near Gamma, while the most
    # probable expert's width follows the router (wider where it is sure)
    page = tmp_path / "top.html"
    out = sample(ckpt, "--show_widths", "--policy=confidence", "--gamma=4", "--width=0.5", "--color_by=top",
                 f"--html={page}")
    assert "the width (h/H) of its most probable expert" in out
    tops = {float(m) for m in MARK.findall(out.split("\nwidths: each token is followed by ⟨w⟩")[0]) if m != "-"}
    assert len(tops) > 1 and min(tops) >= 0.5 - 1e-9          # the top expert gets at least the mean of the two
    assert "most probable expert" in page.read_text(encoding="utf-8")
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={ckpt}", "--show_widths=True", "--color_by=max"],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip() == "sample.py: color_by must be mean or top, got 'max'"


def test_bad_width_layer_is_one_line(ckpt):
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={ckpt}", "--show_widths=True", "--width_layer=2"],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip() == "sample.py: --width_layer=2 but the model has 2 MoE layers " \
                                                     "(0 to 1; -1 = their mean)"


# -----------------------------------------------------------------------------
# the picture


def read_png(path):
    """(H, W, 3) uint8 from an 8-bit RGB(A) PNG without interlacing (what chromium writes): numpy and zlib."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    assert depth == 8 and ctype in (2, 6) and not interlace, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp).astype(np.int64)
    img, prev = np.zeros((h, w * bpp), np.uint8), np.zeros(w * bpp, np.int64)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:]
        if f == 0:
            cur = line
        elif f == 1:   # Sub: a running sum along the row
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 255
        elif f == 2:   # Up
            cur = (line + prev) & 255
        else:          # Average and Paeth depend on the pixel to the left: byte by byte
            cur, up = line.tolist(), prev.tolist()
            for x in range(len(cur)):
                a, b = (cur[x - bpp] if x >= bpp else 0), up[x]
                if f == 3:
                    cur[x] = (cur[x] + ((a + b) >> 1)) & 255
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.array(cur, np.int64)
        img[y], prev = cur, cur
    return img.reshape(h, w, bpp)[:, :, :3]


def screenshot(page, png):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as profile:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--disable-dev-shm-usage", "--force-color-profile=srgb", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1000,700",
                            pathlib.Path(page).as_uri()], capture_output=True, text=True, timeout=120)
    assert png.exists(), f"chromium wrote no screenshot: {p.stderr[-1500:]}"
    return read_png(png)


def visible_widths(img, min_pixels=150):
    """The token colours the picture shows: every colour a token's width can take (multiples of 1/256 here), with
    the pixels painted in it; one counts where it fills at least min_pixels (the legend's gradient bar gives any
    one colour a sliver of a few pixels)."""
    colours = {sw.colour(i / 256): i / 256 for i in range(257)}
    flat = img.reshape(-1, 3).astype(np.int64)
    keys, counts = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2], return_counts=True)
    painted = dict(zip(keys.tolist(), counts.tolist()))
    return {w for rgb, w in colours.items() if painted.get(rgb[0] << 16 | rgb[1] << 8 | rgb[2], 0) >= min_pixels}


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_the_browser_draws_one_colour_for_uniform_and_several_for_confidence(ckpt, tmp_path):
    drawn = {}
    for name, args in (("uniform", ["--width=0.5"]), ("confidence", ["--policy=confidence", "--gamma=20",
                                                                       "--width=0.3"])):
        page = tmp_path / f"{name}.html"
        sample(ckpt, f"--html={page}", *args)
        spans = {tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))
                 for h in re.findall(r'<span[^>]*style="background:#([0-9a-f]{6})', page.read_text())}
        drawn[name] = visible_widths(screenshot(page, tmp_path / f"{name}.png"))
        assert {sw.colour(w) for w in drawn[name]} <= spans, "a width colour the markup does not have"
    assert drawn["uniform"] == {0.5}
    assert len(drawn["confidence"]) >= 2
