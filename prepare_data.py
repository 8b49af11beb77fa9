"""
Prepare a dataset for train.py: token ids as uint16 in data/<name>/train.bin and val.bin, plus meta.pkl
(the tokenizer, so checkpoints and sample.py know how to encode and decode).

    python prepare_data.py shakespeare_char           # Tiny Shakespeare, one token per character
    python prepare_data.py shakespeare                # Tiny Shakespeare, GPT-2 BPE (tiktoken)
    python prepare_data.py openwebtext                # GPT-2 BPE; needs `pip install datasets tqdm`, ~54GB
    python prepare_data.py NAME --input=my.txt --tokenizer=char|gpt2    # any UTF-8 text file
    python prepare_data.py gutenberg_char --input=DIR  # Project Gutenberg books, DIR/<Author>/<Title>.txt, by character
    python prepare_data.py gutenberg --input=DIR       # the same books and split, GPT-2 BPE

--input also replaces the download for shakespeare_char / shakespeare / gutenberg(_char); --out_dir changes data/.
gutenberg_char / gutenberg: each book's licence header and footer cut, line endings made \n, the split by author
(whole authors, about 5 % of the characters, go to val: text by writers the model never read); without --input the
books are downloaded (GUTENBERG_URL, 1.2 GB of text zipped), and --input may also name that zip archive.
--train_fraction=0.25 keeps a quarter of the training split (every 4th block of 8,192 tokens; val unchanged), for
runs that ask how a result moves with the amount of data.
"""

import hashlib
import math
import os
import pickle
import re
import sys
import time
import unicodedata
import zipfile

import numpy as np

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SIZE = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def fail(msg, code=1):
    """One line on stderr and a non-zero exit: these are user errors, a traceback would only hide the fix."""
    print(f"prepare_data.py: {msg}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        sys.exit(0)
    if not argv or argv[0].startswith("-"):
        fail("name the dataset first: python prepare_data.py shakespeare_char|shakespeare|gutenberg_char|gutenberg|"
             "openwebtext|NAME [--input=PATH]", code=2)
    name, opts = argv[0], {"input": None, "tokenizer": None, "out_dir": "data", "train_fraction": "1"}
    for arg in argv[1:]:
        key, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or key not in opts:
            fail(f"unknown option '{arg}' (options: --input=PATH, --tokenizer=char|gpt2, --out_dir=DIR, "
                 f"--train_fraction=F)", code=2)
        opts[key] = value
    try:
        fraction = float(opts["train_fraction"])
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        fail(f"--train_fraction must be a number in (0, 1], got '{opts['train_fraction']}'", code=2)
    opts["train_fraction"] = fraction
    return name, opts


def fetch_shakespeare(path):
    """Download Tiny Shakespeare once; a download that cannot happen names the way around it."""
    if not os.path.exists(path):
        import requests
        try:
            r = requests.get(SHAKESPEARE_URL, timeout=30)
            r.raise_for_status()
        except requests.RequestException as e:
            fail(f"could not download Tiny Shakespeare ({type(e).__name__}). "
                 f"Pass a local copy of {SHAKESPEARE_URL} with --input=PATH/input.txt")
        with open(path + ".part", "wb") as f:   # renamed only when complete: a half file is never reused
            f.write(r.content)
        os.replace(path + ".part", path)
    return path


def check_shakespeare(path, given):
    """The expected token counts (and any comparison with other runs) only hold for this exact file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != SHAKESPEARE_SIZE or hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        fix = "pass the right file with --input" if given else "delete it to download again, or pass one with --input"
        fail(f"{path} is not Tiny Shakespeare: {len(data):,} bytes, expected {SHAKESPEARE_SIZE:,} bytes with "
             f"sha256 {SHAKESPEARE_SHA256}; {fix}")


def write_split(ids, path):
    ids = np.asarray(ids)
    if ids.size and ids.max() > np.iinfo(np.uint16).max:
        fail(f"token id {ids.max()} does not fit in uint16: the vocabulary is too large for this format")
    ids.astype(np.uint16).tofile(path)


def train_subset(ids, fraction, block=8192):
    """A data-scaling run's smaller training split: `fraction` of the blocks of `block` tokens, spread evenly over
    the whole split (0.25: blocks 0, 4, 8, ...), so the subset mixes the same plays as the full text, and the
    validation text, which continues the last play, is as near to it as to the full split."""
    blocks = range(0, len(ids), block)
    step = lambda i: math.floor(i * fraction + 1e-9)           # block i is kept where this count goes up
    keep = [i for i in range(len(blocks)) if step(i) > step(i - 1)]
    return np.concatenate([np.asarray(ids[blocks[i]:blocks[i] + block]) for i in keep])


def char_tokenizer(text):
    chars = sorted(set(text))   # the vocabulary: every character of the whole text
    stoi = {ch: i for i, ch in enumerate(chars)}
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    return (lambda s: [stoi[c] for c in s]), meta


def gpt2_encoding(fail=fail):
    """tiktoken's GPT-2 BPE, or one line naming the fix; sample.py and bench_flops.py pass their own fail."""
    import tiktoken
    try:   # tiktoken downloads its BPE files on first use; offline it needs a cache (TIKTOKEN_CACHE_DIR)
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        fail(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}): go online once, or set "
             f"TIKTOKEN_CACHE_DIR to a folder holding its cached files")


def gpt2_tokenizer(text):
    enc = gpt2_encoding()
    return enc.encode_ordinary, {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}


def prepare_text(text, tokenizer, out, train_fraction=1.0):
    encode, meta = char_tokenizer(text) if tokenizer == "char" else gpt2_tokenizer(text)
    if meta["vocab_size"] > 65536:   # fail before writing anything rather than leave a half-written dataset
        fail(f"{meta['vocab_size']:,} distinct characters: token ids must fit in uint16 (at most 65,536); "
             f"use --tokenizer=gpt2")
    os.makedirs(out, exist_ok=True)
    n = int(0.9 * len(text))   # first 90% of the text is train, the last 10% val: no overlap between them
    train_ids, val_ids = encode(text[:n]), encode(text[n:])
    if train_fraction < 1:   # the vocabulary above still comes from the whole text: checkpoints stay comparable
        full, train_ids = len(train_ids), train_subset(train_ids, train_fraction)
        print(f"--train_fraction={train_fraction:g}: {len(train_ids):,} of the {full:,} training tokens")
    write_split(train_ids, os.path.join(out, "train.bin"))
    write_split(val_ids, os.path.join(out, "val.bin"))
    with open(os.path.join(out, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    print(f"{len(text):,} characters, vocabulary {meta['vocab_size']:,} ({tokenizer})")
    # shakespeare_char: 1,115,394 characters, vocabulary 65; shakespeare: vocabulary 50,257
    print(f"train {len(train_ids):,} tokens, val {len(val_ids):,} tokens -> {out}")
    # shakespeare_char: train 1,003,854 tokens, val 111,540 tokens
    # shakespeare (gpt2): train 301,966 tokens, val 36,059 tokens


def prepare_openwebtext(out, num_proc=8):
    """OpenWebText with GPT-2 BPE: ~9B train tokens (~17GB), ~4M val tokens. One EOT token ends each document."""
    try:
        from datasets import load_dataset
    except ImportError:
        fail("openwebtext needs the 'datasets' package: pip install datasets")
    enc = gpt2_encoding()
    os.makedirs(out, exist_ok=True)
    split = load_dataset("openwebtext", num_proc=num_proc)["train"].train_test_split(
        test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")

    def tokenize(example):
        ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]
        return {"ids": ids, "len": len(ids)}
    tokenized = split.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda it, **kw: it
    for name, dset in tokenized.items():
        total = int(np.sum(dset["len"], dtype=np.uint64))
        arr = np.memmap(os.path.join(out, f"{name}.bin"), dtype=np.uint16, mode="w+", shape=(total,))
        shards, pos = 1024, 0   # write in shards so the whole split never has to sit in memory
        for i in tqdm(range(shards), desc=f"writing {name}.bin"):
            batch = dset.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
            ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, np.uint16)
            arr[pos:pos + len(ids)] = ids
            pos += len(ids)
        arr.flush()
        print(f"{name}: {total:,} tokens")
    with open(os.path.join(out, "meta.pkl"), "wb") as f:
        pickle.dump({"tokenizer": "gpt2", "vocab_size": enc.n_vocab}, f)


# -----------------------------------------------------------------------------
# Project Gutenberg, split by author: text that is not repeated (config/train_gutenberg_mose.py reads about 0.65 of
# it, drawn at random) and a validation split by writers the model never read. The books are
# DIR/<Author>/<Title>.txt, raw as Project Gutenberg distributes them. Without --input they come from the public
# repository rcdm-uga/Gutenberg_Text (3,445 books in 98 author folders, 1.2 GB of text); the copy this project's
# tests and configs use is a subset of it (468 books by 91 authors, 108.5 MB), passed with --input.

GUTENBERG_COMMIT = "a0b16d35a9851168ce9ac649851c17b7ab08d48e"
GUTENBERG_URL = f"https://github.com/rcdm-uga/Gutenberg_Text/archive/{GUTENBERG_COMMIT}.zip"
VAL_FRACTION = 0.05   # of the characters; whole authors, taken in the order of their name's sha256, go to val
MIN_CHAR_COUNT = 10   # a character seen fewer times in train has too few examples to learn: it becomes UNK
UNK = "\ufffd"        # U+FFFD, Unicode's replacement character, in the vocabulary: what rare characters (and, when
                      # scoring other text, characters the vocabulary lacks) are mapped to; meta.pkl's 'unk'
BOOK_SEP = "\n\n\n"   # between books, by character (GPT-2 BPE ends each book with its end-of-text token)
SHARED_LINES = 0.1    # a val book with more of its long lines (>= 50 bytes) in train books is a partial copy of
                      # train text (in the shared copy: Jowett's 'Lesser Hippias', 30 % of it in Plato's 'Menexenus')

# The licence header ends on its last line and the footer starts on its first, in the forms these files use.
# Closing the header: '*** START OF THE PROJECT GUTENBERG EBOOK X ***', an old '*END*THE SMALL PRINT! FOR PUBLIC
# DOMAIN ETEXTS*...', or the version stamp '["Small Print" V.12.08.93]' (the World Library Shakespeare plays).
# Opening the footer: '*** END OF THE PROJECT GUTENBERG EBOOK X ***', 'End of the Project Gutenberg EBook of X',
# "End of Project Gutenberg's X", 'End of this Etext of X', or an old licence printed after the book ('***START**THE
# SMALL PRINT!**'). Matched at line starts, once line endings are \n.
HEADER_END = re.compile(rb'^[ \t]*(\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG|\*+ ?END\*? ?THE SMALL PRINT|\["Small '
                        rb'Print" V\.)', re.M | re.I)
END_OF_BOOK = re.compile(rb"^[ \t]*(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|END (OF )?(THE |THIS )?PROJECT "
                         rb"GUTENBERG|END OF THIS ETEXT OF)", re.M | re.I)
SMALL_PRINT = re.compile(rb"^[ \t]*\*+ ?START\*+ ?THE SMALL PRINT", re.M | re.I)
NOTICE = re.compile(rb"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>\n*", re.S)   # repeated inside those plays


def fetch_gutenberg(out_dir):
    """Download the books once, GitHub's zip of the repository at GUTENBERG_COMMIT (some 0.4-0.5 GB), into
    out_dir, where both gutenberg datasets find it; a download that cannot happen names the way around it."""
    path = os.path.join(out_dir, f"Gutenberg_Text-{GUTENBERG_COMMIT[:8]}.zip")
    if not os.path.exists(path):
        import requests
        try:
            with requests.get(GUTENBERG_URL, stream=True, timeout=60) as r:
                r.raise_for_status()
                os.makedirs(out_dir, exist_ok=True)
                total = int(r.headers.get("content-length", 0)) or None   # GitHub's archives often say nothing
                try:
                    from tqdm import tqdm
                except ImportError:   # optional: no bar then
                    tqdm = None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="downloading the books") if tqdm else None
                with open(path + ".part", "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        f.write(chunk)
                        if bar:
                            bar.update(len(chunk))
                if bar:
                    bar.close()
        except requests.RequestException as e:
            if os.path.exists(path + ".part"):
                os.remove(path + ".part")
            fail(f"could not download the Gutenberg books ({type(e).__name__}). Download {GUTENBERG_URL} "
                 f"elsewhere and pass it, or the folder it unzips to, with --input=PATH")
        os.replace(path + ".part", path)   # renamed only when complete: a half file is never reused
        print(f"downloaded {GUTENBERG_URL} to {path}")
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not a complete zip archive: delete it to download again")
    return path


def list_books(source):
    """The books of a folder, or of a zip archive whose single top folder (GitHub's archives have one) is its
    top: [(author, title, name)], sorted, and a function reading a name's bytes. The author is a book's first
    folder, its name as Unicode composes it and without surrounding spaces (the repository has both 'Alcott,
    Louisa May' and 'Alcott, Louisa May ')."""
    if os.path.isdir(source):
        names = [os.path.relpath(os.path.join(d, f), source).replace(os.sep, "/")
                 for d, _, files in os.walk(source) for f in files]

        def read(name):
            with open(os.path.join(source, name), "rb") as f:
                return f.read()
    elif os.path.isfile(source) and zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        names = [n for n in archive.namelist() if not n.endswith("/")]
        tops = {n.split("/")[0] for n in names}
        top = tops.pop() + "/" if len(tops) == 1 and all("/" in n for n in names) else ""
        names = [n[len(top):] for n in names]
        read = lambda name: archive.read(top + name)
    else:
        fail(f"--input={source} is not a folder (or a zip archive of one): give DIR holding DIR/<Author>/<Title>.txt")
    texts = sorted(n for n in names if n.lower().endswith(".txt") and not any(p.startswith(".") for p in n.split("/")))
    if not texts:
        fail(f"no .txt files in {source}: expected {source}/<Author>/<Title>.txt")
    books = [(unicodedata.normalize("NFC", n.split("/")[0]).strip(), n.rsplit("/", 1)[1][:-4], n)
             for n in texts if "/" in n]
    if not books:
        fail(f"{source} has .txt files but no author folders: put each author's books in {source}/<Author>/")
    if len(books) < len(texts):
        print(f"skipped {len(texts) - len(books)} .txt files outside author folders")
    return books, read


def progress(items, desc):
    """tqdm's bar over items on a terminal, if it is installed (disable=None: a log, or a test reading stderr,
    gets only the stage lines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=None)


def read_book(read, name):
    """A book's bytes, or one clear line."""
    try:
        return read(name)
    except (OSError, zipfile.BadZipFile, EOFError) as e:   # unreadable file, damaged archive
        fail(f"cannot read {name}: {getattr(e, 'strerror', None) or e}")


def strip_gutenberg(raw):
    """A book's text, line endings made \\n, without its licence header and footer: (body, had_header,
    had_footer). Without a marker a book is kept from its first line, or to its last."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = END_OF_BOOK.search(text)
    # a header ends before the book does: an '*END*THE SMALL PRINT' after the end of the book closes a licence
    # printed after it, and that book has no header marker
    head = HEADER_END.search(text, 0, end.start() if end else len(text))
    start = (text.find(b"\n", head.end()) + 1 or len(text)) if head else 0
    foot = [m.start() for m in (END_OF_BOOK.search(text, start), SMALL_PRINT.search(text, start)) if m]
    return NOTICE.sub(b"", text[start:min(foot, default=len(text))]).strip(), head is not None, bool(foot)


def codepoints(body):
    """A book's characters as Unicode code points: the bytes as they are for ASCII (most books), else decoded
    as UTF-8 (an invalid byte becomes U+FFFD, the replacement symbol anyway)."""
    if body.isascii():
        return np.frombuffer(body, np.uint8)
    return np.frombuffer(body.decode("utf-8", errors="replace").encode("utf-32-le"), np.uint32)


def title_key(title):
    """Two copies of one title compare equal: case, accents and punctuation ignored ("Grimm's Fairy Tales" and
    "Grimms' Fairy Tales"; a copy that saved ':' as '_')."""
    return "".join(c for c in unicodedata.normalize("NFKD", title).casefold() if c.isalnum())


def author_order(author):
    """A stable order of authors (sha256 of the name: the same on every machine and run, unlike hash())."""
    return hashlib.sha256(author.encode("utf-8")).digest()


def scan_books(books, read):
    """The first pass: per book its length in characters, its characters' counts, its text's sha256 and which
    markers it had. Only these stay in memory; the second pass reads the text again to write it."""
    scanned = []
    for author, title, name in progress(books, "reading"):
        body, head, foot = strip_gutenberg(read_book(read, name))
        counts = np.bincount(codepoints(body))
        chars = np.flatnonzero(counts)
        # its long lines, hashed (hash() is enough: they are compared within this run only)
        lines = np.unique(np.fromiter((hash(line) for line in body.split(b"\n") if len(line) >= 50), np.int64))
        scanned.append(dict(author=author, title=title, name=name, key=title_key(title), size=int(counts.sum()),
                            sha=hashlib.sha256(body).digest(), chars=chars, counts=counts[chars], lines=lines,
                            head=head, foot=foot))
    return scanned


def split_by_author(scanned):
    """The validation authors: the first in author_order, until they hold VAL_FRACTION of the characters (at
    least one author, at least one left for train)."""
    size = {}
    for b in scanned:
        size[b["author"]] = size.get(b["author"], 0) + b["size"]
    if len(size) < 2:
        fail(f"the books are by {len(size)} author ({next(iter(size))}): validation holds other authors than "
             f"training, so give at least two author folders")
    val, taken = set(), 0
    for author in sorted(size, key=author_order):
        if taken >= VAL_FRACTION * sum(size.values()):
            break
        val.add(author)
        taken += size[author]
    return val


def drop_duplicates(scanned, val_authors):
    """Train and val books, each in author_order then by title, with one copy of each text and no title on both
    sides: a translator's or an illustrator's folder may hold a book of another author's. Train comes first, so
    a copy kept is train's: a book is dropped if its text is an exact copy (once stripped) of one kept, and a val
    book also if a train book has its title (another edition of the work) or if it is a partial copy of train
    text (SHARED_LINES). Empty books are dropped."""
    order = sorted(scanned, key=lambda b: (author_order(b["author"]), b["title"]))
    seen, dropped = set(), dict(copies=0, titles=0, partial=0, empty=0)

    def drop(b, why):
        """Why b is dropped (None: kept), counted."""
        why = "empty" if not b["size"] else "copies" if b["sha"] in seen else why
        if why:
            dropped[why] += 1
        seen.add(b["sha"])
        return why

    train = [b for b in order if b["author"] not in val_authors and not drop(b, None)]
    if not train:
        fail("the training split is empty: every book of its authors is empty or a copy")
    titles = {b["key"] for b in train}
    lines = np.unique(np.concatenate([b["lines"] for b in train]))   # sorted, so searchsorted finds a line

    def partial(b):
        found = lines[np.searchsorted(lines, b["lines"]).clip(max=len(lines) - 1)] == b["lines"] if len(lines) else 0
        return np.sum(found) > SHARED_LINES * len(b["lines"])

    val = [b for b in order if b["author"] in val_authors
           and not drop(b, "titles" if b["key"] in titles else "partial" if partial(b) else None)]
    if not val:
        fail("the validation split is empty once copies of training books are dropped: give more authors")
    return train, val, dropped


def char_encoder(train):
    """The vocabulary: the characters seen at least MIN_CHAR_COUNT times in train, and UNK. Returns the encoder
    (a lookup table from every code point to its id, UNK's for the rest, so no Python loop per character), meta,
    and how many train characters became UNK."""
    counts = np.zeros(0x110000, np.int64)
    for b in train:
        counts[b["chars"]] += b["counts"]
    chars = sorted(set(np.flatnonzero(counts >= MIN_CHAR_COUNT).tolist()) | {ord(UNK)})
    if len(chars) > 65536:
        fail(f"{len(chars):,} characters: token ids must fit in uint16 (at most 65,536); raise MIN_CHAR_COUNT")
    lut = np.full(0x110000, chars.index(ord(UNK)), np.uint16)
    lut[chars] = np.arange(len(chars))
    sep = lut[codepoints(BOOK_SEP.encode())]
    encode = lambda body: np.concatenate([lut[codepoints(body)], sep])
    stoi = {chr(c): i for i, c in enumerate(chars)}
    meta = {"tokenizer": "char", "vocab_size": len(chars), "itos": {i: ch for ch, i in stoi.items()}, "stoi": stoi,
            "unk": UNK}
    return encode, meta, int(counts.sum() - counts[chars].sum())


def gpt2_book_encoder():
    enc = gpt2_encoding()
    encode = lambda body: np.array(enc.encode_ordinary(body.decode("utf-8", errors="replace")) + [enc.eot_token],
                                   np.uint16)
    return encode, {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}


def write_books(path, books, read, encode, desc):
    """The second pass: each book read, stripped and encoded again, and appended to path as uint16, so a split
    never sits in memory whole. Returns the tokens written per author, in the file's order."""
    per_author = {}
    with open(path + ".part", "wb") as f:
        for b in progress(books, desc):
            ids = encode(strip_gutenberg(read_book(read, b["name"]))[0])
            ids.tofile(f)
            per_author[b["author"]] = per_author.get(b["author"], 0) + len(ids)
    os.replace(path + ".part", path)
    return per_author


def prepare_gutenberg(source, tokenizer, out, train_fraction=1.0):
    t0 = time.time()
    books, read = list_books(source)
    scanned = scan_books(books, read)
    no_head, no_foot = sum(not b["head"] for b in scanned), sum(not b["foot"] for b in scanned)
    print(f"[1/3] read {len(scanned)} books by {len({b['author'] for b in scanned})} authors, "
          f"{sum(b['size'] for b in scanned):,} characters once stripped ({time.time() - t0:.1f}s); {no_head} "
          f"without a header marker kept from their first line, {no_foot} without a footer marker to their last")
    train, val, dropped = drop_duplicates(scanned, split_by_author(scanned))
    chars = lambda bs: sum(b["size"] for b in bs)
    val_authors = sorted({b["author"] for b in val}, key=author_order)
    print(f"[2/3] split by author: val {len(val_authors)} authors ({'; '.join(val_authors)}), {len(val)} books, "
          f"{chars(val):,} characters ({chars(val) / (chars(val) + chars(train)):.1%}); train "
          f"{len({b['author'] for b in train})} authors, {len(train)} books, {chars(train):,} characters; dropped "
          f"{dropped['copies']} exact copies, {dropped['titles']} val books whose title is in train, "
          f"{dropped['partial']} partial copies of train text, {dropped['empty']} empty books")
    if tokenizer == "char":
        encode, meta, rare = char_encoder(train)
        print(f"      vocabulary {meta['vocab_size']} characters (seen >= {MIN_CHAR_COUNT} times in train, and "
              f"U+FFFD); {rare:,} rarer train characters map to U+FFFD")
    else:
        encode, meta = gpt2_book_encoder()
    os.makedirs(out, exist_ok=True)
    train_path = os.path.join(out, "train.bin")
    per_author = write_books(train_path, train, read, encode, "train.bin")
    n_val = sum(write_books(os.path.join(out, "val.bin"), val, read, encode, "val.bin").values())
    n_train = sum(per_author.values())
    if train_fraction < 1:   # the vocabulary above still comes from the whole split: checkpoints stay comparable
        train_ids = train_subset(np.fromfile(train_path, dtype=np.uint16), train_fraction)
        print(f"--train_fraction={train_fraction:g}: {len(train_ids):,} of the {n_train:,} training tokens")
        write_split(train_ids, train_path)
        n_train = len(train_ids)
    else:   # train.py's --holdout_authors holds out the last authors of train.bin by these counts (a subset
        # above mixes every author's blocks: it has no such tail)
        meta["train_authors"] = list(per_author.items())   # [(author, tokens)] in train.bin's order
    with open(os.path.join(out, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    print(f"[3/3] train {n_train:,} tokens, val {n_val:,} tokens ({tokenizer}) -> {out} ({time.time() - t0:.1f}s)")
    # train.py's --holdout_authors=N holds out the last N authors of train.bin: text by writers the model never
    # read, as val is
    tail = list(per_author.items())[-min(3, len(per_author) - 1):]   # never every author
    if train_fraction == 1 and len(per_author) > 1:
        print("      train.bin ends with " + ", ".join(f"{a} ({n:,} tokens)" for a, n in tail) + "; --holdout_authors="
              + " / ".join(str(i) for i in range(1, len(tail) + 1)) + " holds out the last "
              + " / ".join(f"{sum(n for _, n in tail[-i:]):,}" for i in range(1, len(tail) + 1)) + " tokens")


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    name, opts = parse_args(sys.argv[1:])
    tokenizer = opts["tokenizer"] or {"shakespeare_char": "char", "gutenberg_char": "char"}.get(name, "gpt2")
    if tokenizer not in ("char", "gpt2"):
        fail(f"--tokenizer must be char or gpt2, got '{tokenizer}'")
    out = os.path.join(opts["out_dir"], name)
    given = opts["input"] is not None
    if name in ("gutenberg_char", "gutenberg"):   # a folder of books (or its zip), not one text file
        prepare_gutenberg(opts["input"] if given else fetch_gutenberg(opts["out_dir"]), tokenizer, out,
                          opts["train_fraction"])
        sys.exit(0)
    if given and not os.path.isfile(opts["input"]):
        fail(f"--input={opts['input']}: no such file")
    if name == "openwebtext" and not given:
        if tokenizer != "gpt2":
            fail("openwebtext is prepared with --tokenizer=gpt2 only")
        if opts["train_fraction"] < 1:
            fail("--train_fraction is for text files and Shakespeare; for openwebtext shorten the run instead "
                 "(train.py --max_train_flops)")
        prepare_openwebtext(out)
        sys.exit(0)
    if name in ("shakespeare_char", "shakespeare"):
        if not given:
            os.makedirs(out, exist_ok=True)
        path = opts["input"] if given else fetch_shakespeare(os.path.join(out, "input.txt"))
        check_shakespeare(path, given)
    elif not given:
        fail(f"'{name}' is not a known dataset (shakespeare_char, shakespeare, gutenberg_char, gutenberg, "
             f"openwebtext): "
             f"pass your own text with --input=PATH")
    else:
        path = opts["input"]
    try:   # newline="": keep the text exactly as it is in the file (\r\n included), so decoding gives it back
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it, e.g. iconv -t UTF-8")
    if not text.strip():   # nothing to learn from, and train.py would only fail later on an empty split
        fail(f"{path} is empty{' (only whitespace)' if text else ''}: give a text file with --input=PATH")
    prepare_text(text, tokenizer, out, opts["train_fraction"])
