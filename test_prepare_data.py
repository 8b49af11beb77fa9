"""Tests of prepare_data.py on the shared Tiny Shakespeare copy and on small files made here."""

import hashlib
import os
import pickle
import subprocess
import sys

import importlib.util

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


def offline_env(**extra):
    """Every proxy variable (lower case wins in requests) points at a closed port: any download fails at once."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[k] = "http://127.0.0.1:9"
    return dict(env, **extra)


def one_line_error(p, *words, code=None):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert code is None or p.returncode == code, (p.returncode, p.stderr)
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


def test_train_fraction_keeps_evenly_spread_blocks(shared_data, tmp_path):
    # a data-scaling run's smaller dataset: every 4th block of 8,192 training tokens, the same val and vocabulary
    src = shared_data / "tinyshakespeare" / "input.txt"
    assert prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path / 'full'}").returncode == 0
    p = prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path / 'q'}", "--train_fraction=0.25")
    assert p.returncode == 0 and "253,952 of the 1,003,854 training tokens" in p.stdout, p.stderr
    full, val, meta = load(tmp_path / "full", "shakespeare_char")
    train, val_q, meta_q = load(tmp_path / "q", "shakespeare_char")
    blocks = [full[i:i + 8192] for i in range(0, len(full), 8192)]
    assert np.array_equal(train, np.concatenate(blocks[::4]))       # blocks 0, 4, 8, ... of the whole split
    assert np.array_equal(val, val_q) and meta == meta_q
    for bad in ("0", "1.5", "half"):
        one_line_error(prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path}", f"--train_fraction={bad}"),
                       "--train_fraction must be a number in (0, 1]", bad, code=2)


def test_gpt2_shakespeare(shared_data, tmp_path):
    p = prepare("shakespeare", f"--input={shared_data / 'tinyshakespeare' / 'input.txt'}", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path, "shakespeare")
    assert (len(train), len(val), meta["tokenizer"], meta["vocab_size"]) == (301_966, 36_059, "gpt2", 50257)


def test_any_text_file_keeps_non_ascii(tmp_path):
    src = tmp_path / "mine.txt"
    text = "héllo wörld ✓\n" * 50 + "windows line\r\n"
    src.write_bytes(text.encode("utf-8"))
    p = prepare("mine", f"--input={src}", "--tokenizer=char", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path, "mine")
    assert {"é", "ö", "✓", "\r"} <= set(meta["stoi"]) and meta["vocab_size"] == len(set(text))
    assert len(train) == int(0.9 * len(text))   # split by position: the first 90% is train
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == text   # the file, exactly


def test_char_vocab_too_big_for_uint16(tmp_path):
    src = tmp_path / "wide.txt"
    src.write_text("".join(chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000),
                   encoding="utf-8")
    one_line_error(prepare("wide", f"--input={src}", "--tokenizer=char", f"--out_dir={tmp_path}"), "uint16")
    assert not (tmp_path / "wide").exists()   # nothing half-written


def test_gpt2_without_tiktoken_files_offline(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text("hello world\n", encoding="utf-8")
    env = offline_env(TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"))
    one_line_error(prepare("mine", f"--input={src}", "--tokenizer=gpt2", f"--out_dir={tmp_path}", env=env),
                   "TIKTOKEN_CACHE_DIR")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="'datasets' is installed")
def test_openwebtext_needs_datasets(tmp_path):
    p = prepare("openwebtext", f"--out_dir={tmp_path}")
    one_line_error(p, "pip install datasets", code=1)
    assert p.stderr.strip() == "prepare_data.py: openwebtext needs the 'datasets' package: pip install datasets"
    one_line_error(prepare("openwebtext", f"--out_dir={tmp_path}", "--train_fraction=0.5"), "--max_train_flops", code=1)


def test_wrong_shakespeare_file_is_refused(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    one_line_error(prepare("shakespeare_char", f"--input={src}", f"--out_dir={tmp_path}"), "1,115,394 bytes",
                   "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "--input")
    assert not (tmp_path / "shakespeare_char").exists()


def test_offline_download_names_the_fix(tmp_path):
    one_line_error(prepare("shakespeare_char", f"--out_dir={tmp_path}", env=offline_env()), "--input=", code=1)
    assert not (tmp_path / "shakespeare_char" / "input.txt").exists()   # no half-written download left


def test_downloaded_copy_is_reused_and_checked(shared_data, tmp_path):
    """A data/<name>/input.txt from an earlier download is used as is (no network), after the same check."""
    (tmp_path / "shakespeare_char").mkdir()
    cached = tmp_path / "shakespeare_char" / "input.txt"
    cached.write_bytes((shared_data / "tinyshakespeare" / "input.txt").read_bytes())
    p = prepare("shakespeare_char", f"--out_dir={tmp_path}", env=offline_env())
    assert p.returncode == 0 and "train 1,003,854 tokens, val 111,540 tokens" in p.stdout, p.stderr
    cached.write_bytes(cached.read_bytes()[:-1])
    one_line_error(prepare("shakespeare_char", f"--out_dir={tmp_path}", env=offline_env()), "delete it")


@pytest.mark.parametrize("args,words,code", [
    (["shakespeare_char", "--inptu=x"], ["unknown option '--inptu=x'"], 2),
    (["shakespeare_char", "--input"], ["unknown option '--input'"], 2),
    (["--input=x.txt"], ["name the dataset first"], 2),
    (["mine", "--input=README.md", "--tokenizer=bpe"], ["--tokenizer must be char or gpt2"], 1),
    (["mine", "--input=/no/such/file.txt"], ["no such file"], 1),
    (["mine", "--input="], ["no such file"], 1),
    (["mine"], ["not a known dataset", "--input"], 1),
])
def test_bad_arguments_are_one_clear_line(args, words, code, tmp_path):
    one_line_error(prepare(*args, f"--out_dir={tmp_path}"), *words, code=code)
    assert not os.listdir(tmp_path)   # an error writes nothing


def test_help():
    p = prepare("--help")
    assert p.returncode == 0 and "--tokenizer=char|gpt2" in p.stdout


# --- gutenberg_char / gutenberg: books by author, split by author ------------------------------------------------

REAL_BOOKS = {   # small books of the shared copy, in both marker styles (new '*** START OF', old '*END*THE SMALL
    # PRINT'), with a line from each one's text: it is in the prepared text iff the book is
    "Jowett, Benjamin": {"Crito": "SOCRATES:  And if he disobeys and disregards the opinion and approval of",
                         "Ion": "nothing that any one would care to remember but the famous paean which"},
    "Potter, Beatrix": {"The Tale of Peter Rabbit": "And got caught by the large buttons on his jacket.",
                        "The Tale of Benjamin Bunny": "onions, as a little present for his Aunt."},
    "Poe, Edgar Allan": {"The Cask of Amontillado": "A huge human foot d'or, in a field azure; the foot crushes",
                         "The Masque of the Red Death": "He had directed, in great part, the movable embellishments"},
    "Hawthorne, Nathaniel": {"A Rill from the Town Pump": "partly covered the site of yonder stately brick one."},
    "Shakespeare, William": {"Sonnets on Sundry Notes of Music": "What though she strive to try her strength,"},
}
MARKED = ("*** START OF THIS PROJECT GUTENBERG EBOOK {0} ***\n{1}\n*** END OF THIS PROJECT GUTENBERG EBOOK {0} ***\n"
          "FOOTER-LICENCE\n")


@pytest.fixture(scope="module")
def books(shared_data, tmp_path_factory):
    """A folder of a few authors: real books, and made-up ones for the cases the split must handle. By the rule
    (authors in sha256 order of their names, until 5 % of the characters) Jowett, first in that order, is val."""
    root = tmp_path_factory.mktemp("books") / "gutenberg"
    for author, titles in REAL_BOOKS.items():
        (root / author).mkdir(parents=True)
        for t in titles:
            (root / author / f"{t}.txt").write_bytes((shared_data / "gutenberg" / author / f"{t}.txt").read_bytes())
    mixed = MARKED.format("MIXED", "line one\nline two\rline three ж ж ж")
    made = {   # author/title -> text
        # another edition of a val title under a train author (a translator): the val copy must go
        "Translator, A./Crito_.txt": MARKED.format("CRITO", "Socrates speaks to Crito in another translation.\n" * 40),
        # the same text as a train book (LF here, CRLF there) under another title: one copy only
        "Copyist, C./A Copy of Peter.txt": (root / "Potter, Beatrix/The Tale of Peter Rabbit.txt").read_text(
            encoding="utf-8").replace("\r\n", "\n"),
        # no markers at all: kept whole
        "Unmarked, U./Notes.txt": "A plain note kept whole, first line and all, without markers.\n" * 30,
        # CRLF and a bare CR, and a character seen 3 times in train (rare: becomes U+FFFD)
        "Windows, W./Mixed.txt": mixed.replace("\n", "\r\n"),
        # a val book with a character train never has (20 times): U+FFFD at evaluation too
        "Jowett, Benjamin/Greek.txt": MARKED.format("GREEK", "The letter psi: ψ.\n" * 20),
    }
    for name, text in made.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    return root


def decoded(out, name):
    train, val, meta = load(out, name)
    itos = meta["itos"]
    return "".join(itos[int(i)] for i in train), "".join(itos[int(i)] for i in val), meta


@pytest.fixture(scope="module")
def gutenberg_char(books, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    p = prepare("gutenberg_char", f"--input={books}", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr
    return out, p.stdout


def test_gutenberg_char_strips_markers_and_line_endings(books, gutenberg_char):
    out, stdout = gutenberg_char
    train, val, meta = decoded(out, "gutenberg_char")
    text = train + val
    for marker in ("*** START OF", "*** END OF", "SMALL PRINT", "End of Project Gutenberg", "End of this Project",
                   "FOOTER-LICENCE", "Etexts Readable By Both Humans"):
        assert marker not in text, marker
    assert "\r" not in meta["stoi"] and "line one\nline two\nline three" in train
    assert "A plain note kept whole, first line and all" in train and "1 without a header marker" in stdout
    assert "1 without a footer marker" in stdout   # the same book
    assert "Once upon a time there were four little rabbits" in train   # a body survives, its first lines too
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(meta["stoi"]) == len(meta["itos"])


def test_gutenberg_char_splits_by_author(books, gutenberg_char):
    out, stdout = gutenberg_char
    train, val, _ = decoded(out, "gutenberg_char")
    authors = sorted((p.name for p in books.iterdir()), key=lambda a: hashlib.sha256(a.encode()).digest())
    assert authors[0] == "Jowett, Benjamin" and "val 1 authors (Jowett, Benjamin)" in stdout
    for author, titles in REAL_BOOKS.items():
        for t, line in titles.items():
            where = (train.count(line), val.count(line))
            if t == "Crito":   # its title is also under a train author: dropped from val
                assert where == (0, 0), t
            else:              # on its author's side, once (Peter Rabbit's copy under another author dropped)
                assert where == ((0, 1) if author == "Jowett, Benjamin" else (1, 0)), t
    assert "Socrates speaks to Crito in another translation." in train
    assert "dropped 1 exact copies, 1 val books whose title is in train" in stdout


def test_gutenberg_records_the_training_authors_in_train_bins_order(books, gutenberg_char, tmp_path):
    # meta.pkl's train_authors: [(author, tokens)] in the order of train.bin, whose blocks they are (train.py's
    # --holdout_authors holds out the last ones)
    out, stdout = gutenberg_char
    train, _, meta = decoded(out, "gutenberg_char")
    authors = meta["train_authors"]
    assert sum(n for _, n in authors) == len(train) and "Jowett, Benjamin" not in dict(authors)   # val's
    assert [a for a, _ in authors] == sorted(dict(authors), key=lambda a: hashlib.sha256(a.encode()).digest())
    ends = dict(zip(dict(authors), np.cumsum([n for _, n in authors]).tolist()))
    for author, titles in REAL_BOOKS.items():   # a character is a token: each book lies in its author's block
        for t, line in titles.items():
            if author in ends:
                assert ends[author] - dict(authors)[author] <= train.index(line) < ends[author], (author, t)
    tail = [n for _, n in authors[-3:]]
    assert (f"--holdout_authors=1 / 2 / 3 holds out the last {tail[2]:,} / {tail[1] + tail[2]:,} / {sum(tail):,} "
            f"tokens") in stdout
    # a subset (--train_fraction) mixes every author's blocks: it has no authors' tail to hold out
    assert prepare("gutenberg_char", f"--input={books}", f"--out_dir={tmp_path}", "--train_fraction=0.5").returncode == 0
    assert "train_authors" not in load(tmp_path, "gutenberg_char")[2]


def test_gutenberg_char_replacement_symbol(gutenberg_char):
    out, _ = gutenberg_char
    train, val, meta = decoded(out, "gutenberg_char")
    assert meta["unk"] == "\ufffd" and "\ufffd" in meta["stoi"]
    assert "ж" not in meta["stoi"] and "line three \ufffd \ufffd \ufffd" in train   # rare in train (3 < 10)
    assert "ψ" not in meta["stoi"] and "The letter psi: \ufffd." in val               # never in train


def test_gutenberg_is_deterministic_and_the_zip_is_the_folder(books, gutenberg_char, tmp_path):
    # a second run gives the same bytes; so does the same folder zipped as GitHub zips a repository, found where
    # the download would have put it (no network)
    out, _ = gutenberg_char
    assert prepare("gutenberg_char", f"--input={books}", f"--out_dir={tmp_path / 'again'}").returncode == 0
    import zipfile
    with zipfile.ZipFile(tmp_path / "Gutenberg_Text-a0b16d35.zip", "w") as z:
        for path in sorted(books.rglob("*.txt")):
            z.write(path, "Gutenberg_Text-a0b16d35/" + path.relative_to(books).as_posix())
    p = prepare("gutenberg_char", f"--out_dir={tmp_path}", env=offline_env())
    assert p.returncode == 0, p.stderr
    for again in (tmp_path / "again", tmp_path):
        for f in ("train.bin", "val.bin", "meta.pkl"):
            assert (again / "gutenberg_char" / f).read_bytes() == (out / "gutenberg_char" / f).read_bytes(), f


def test_gutenberg_gpt2_has_the_same_split(shared_data, books, gutenberg_char, tmp_path):
    import tiktoken
    p = prepare("gutenberg", f"--input={books}", f"--out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    train, val, meta = load(tmp_path, "gutenberg")
    authors = meta.pop("train_authors")
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257}
    enc = tiktoken.get_encoding("gpt2")
    assert (train == enc.eot_token).sum() == 9 and (val == enc.eot_token).sum() == 2   # one per book kept
    _, char_val, char_meta = decoded(gutenberg_char[0], "gutenberg_char")   # the same books, the same text
    # the same authors in the same order, their counts in GPT-2 tokens
    assert [a for a, _ in authors] == [a for a, _ in char_meta["train_authors"]]
    assert sum(n for _, n in authors) == len(train)
    text = enc.decode(val.tolist()).replace("<|endoftext|>", "\n\n\n")
    assert "".join(c if c in char_meta["stoi"] else "\ufffd" for c in text) == char_val


def test_gutenberg_download_streams_to_a_part_file(books, tmp_path, monkeypatch):
    # the download path, from a local server standing in for GitHub: the archive arrives whole, under its name
    import functools
    import http.server
    import threading
    import zipfile
    import prepare_data
    (tmp_path / "served").mkdir()
    with zipfile.ZipFile(tmp_path / "served" / "books.zip", "w") as z:
        for path in sorted(books.rglob("*.txt")):
            z.write(path, "top/" + path.relative_to(books).as_posix())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(prepare_data, "GUTENBERG_URL", f"http://127.0.0.1:{server.server_port}/books.zip")
    try:
        path = prepare_data.fetch_gutenberg(str(tmp_path / "data"))
    finally:
        server.shutdown()
    assert open(path, "rb").read() == (tmp_path / "served" / "books.zip").read_bytes()
    assert os.listdir(tmp_path / "data") == [os.path.basename(path)]   # no .part left
    assert len(prepare_data.list_books(path)[0]) == len(list(books.rglob("*.txt")))


def test_gutenberg_download_offline_names_the_fix(tmp_path):
    one_line_error(prepare("gutenberg_char", f"--out_dir={tmp_path}", env=offline_env()), "--input=", code=1)
    assert not list(tmp_path.rglob("*.zip*"))   # no half-written download left


@pytest.mark.parametrize("case,words", [
    ("file", ["is not a folder"]),
    ("empty", ["no .txt files"]),
    ("loose", ["no author folders"]),
    ("one_author", ["1 author", "at least two author folders"]),
    ("unreadable", ["cannot read", "Gone/gone.txt"]),
])
def test_gutenberg_bad_input_is_one_clear_line(case, words, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    book = MARKED.format("X", "Some text of a book.\n" * 20)
    if case == "file":
        src = tmp_path / "book.txt"
        src.write_text(book)
    elif case == "loose":
        (src / "book.txt").write_text(book)
    elif case in ("one_author", "unreadable"):
        (src / "Solo").mkdir()
        (src / "Solo" / "book.txt").write_text(book)
    if case == "unreadable":   # a link to nowhere: listed as a book, cannot be opened (also as root)
        (src / "Gone").mkdir()
        (src / "Gone" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    one_line_error(prepare("gutenberg_char", f"--input={src}", f"--out_dir={tmp_path / 'out'}"), *words, code=1)
    assert not (tmp_path / "out").exists()   # an error writes nothing
