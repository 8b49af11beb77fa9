"""
Config as plain Python, nanoGPT style, with the sharp edges filed off. A script declares its defaults as
module-level globals, then calls

    configure(globals())

Each argument without '--' is a config file (Python) that assigns some of those globals; each --key=value
overrides one, and a bare --key sets a True/False key to True (--show_widths). Values are parsed as Python
literals (falling back to a string) and must have the type of the default (an int is accepted for a float,
"1.0,0.5" or a single number for a tuple). An unknown key or a wrong type stops the script with one line that
says what to fix.

setup_device() turns the two system keys every script shares, device and dtype, into a checked device and
the autocast context to run the model under. Two more sharp edges of train.py's, each ending in one line rather
than a traceback: report_lost_rank (a DDP rank that died) and stop_non_finite (a step whose loss or gradients are
not finite, with first_non_finite: where the inf or NaN is born).
"""

import ast
import os
import sys


def fail(msg):
    prog = sys.argv[0].split("/")[-1] or "script"
    sys.exit(f"{prog}: {msg}")


def check_ranges(config, rules):
    """Fail with one line at the first config value outside its range: rules maps a key to (test, what),
    e.g. {"learning_rate": (lambda v: v > 0, "> 0")}, so a bad number never reaches torch."""
    for key, (ok, what) in rules.items():
        value = config[key]
        for v in (value if isinstance(value, tuple) else (value,)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                fail(f"--{key} must be {what}, got {value!r}")


def coerce(key, value, default):
    """Return value converted to the type of default, or fail with a clear line."""
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool) or default is None
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        ok = True
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        fail(f"--{key} must be of type {type(default).__name__} like its default {default!r}, got {value!r}")
    return value


def parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text   # a bare string, e.g. --dataset=shakespeare_char


def configure(defaults, argv=None, aliases=None, given=None):
    """Apply config files and --key=value overrides to `defaults` (a script's globals()); returns the config.
    `given`, a set, receives the keys set on the command line (a script may let them win over a config's)."""
    known = {k for k, v in defaults.items()
             if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}
    for arg in (sys.argv[1:] if argv is None else argv):
        if not arg.startswith("--"):
            if "=" in arg:
                fail(f"'{arg}' is neither a config file nor --key=value")
            try:
                source = open(arg).read()
            except OSError as e:
                fail(f"cannot read config file {arg}: {e.strerror}")
            print(f"Overriding config with {arg}:\n{source}")
            values = {}
            try:
                exec(compile(source, arg, "exec"), {}, values)   # config files are trusted Python, as in nanoGPT
            except Exception as e:   # the user's own code: the line that broke is the fix, a traceback is not
                import traceback
                lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg]
                line = e.lineno if isinstance(e, SyntaxError) else lines[-1] if lines else "?"
                why = e.msg if isinstance(e, SyntaxError) else (str(e).splitlines() or [""])[0][:160]
                fail(f"config file {arg} raised {type(e).__name__} at line {line}: {why}")
            items = [(k, v) for k, v in values.items()   # skip imports, helpers and _private names
                     if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
        else:
            key, sep, text = arg[2:].partition("=")
            key = (aliases or {}).get(key, key)   # e.g. --json= for json_path (a key 'json' would shadow the module)
            if not sep:   # a bare --flag: True for a True/False key (--show_widths), else a value is missing
                if key in known and not isinstance(defaults[key], bool):
                    fail(f"'{arg}' needs a value: {arg}=VALUE (a bare --flag sets only a True/False key)")
                text = "True"
            # a string key takes the text as it is (--start=1999 is a prompt, not a number)
            items = [(key, text if isinstance(defaults.get(key), str) else parse(text))]
            print(f"Overriding: {key} = {text}")
            if given is not None:
                given.add(key)
        for key, value in items:
            if key not in known:
                close = [k for k in sorted(known) if key.split("_")[0] in k][:6]
                fail(f"unknown config key '{key}'" + (f" (did you mean one of: {', '.join(close)}?)" if close else ""))
            defaults[key] = coerce(key, value, defaults[key])
    return {k: defaults[k] for k in sorted(known)}


DTYPES = ("float32", "bfloat16", "float16")


def setup_device(device="auto", dtype="auto"):
    """device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps. dtype: auto (bfloat16 on cuda where
    supported, else float16; float32 elsewhere) or one of DTYPES. Returns (device, device_type, dtype, ctx):
    ctx is the autocast context for the forward pass, a no-op in float32. Fails with one line on a device
    this machine does not have, rather than deep inside torch at the first .to(device)."""
    import contextlib
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        fail(f"device must be auto, cpu, cuda, cuda:N or mps; got '{device}'")
    if device_type not in ("cpu", "cuda", "mps"):
        fail(f"device must be auto, cpu, cuda, cuda:N or mps; got '{device}'")
    if (device_type == "cuda" and not torch.cuda.is_available()) or \
            (device_type == "mps" and not torch.backends.mps.is_available()):
        fail(f"device '{device}' is not available on this machine (try --device=cpu)")
    if dtype == "auto":
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
    if dtype not in DTYPES:
        fail(f"dtype must be auto, {', '.join(DTYPES)}; got '{dtype}'")
    ctx = contextlib.nullcontext() if dtype == "float32" else \
        torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
    return device, device_type, dtype, ctx


# peak dense bf16/fp16 tensor FLOP/s by GPU name, for train.py's MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
              "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def gpu_peak_flops(device):
    """The peak FLOP/s of a cuda device from PEAK_FLOPS; None elsewhere, or for a GPU the table does not know."""
    import torch
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def heap_trimmer(grow=1.5):
    """A function to call once a step that decides when the C heap hands memory back to the OS: whenever the
    process's resident memory has grown to `grow` times what the last trim left (glibc's malloc_trim), and never
    in between (blocks over 32 MB excepted: glibc maps and unmaps each of those on its own); a no-op where there is
    no glibc or no /proc.

    Why never in between: left to itself glibc serves blocks over 128 kB (a bound it moves, up to 32 MB) with an
    mmap of their own and gives the top of its heap back as soon as enough of it is free, so memory one step frees
    the next step page-faults back, 4 kB at a time, more or fewer by what ran before it: whole 3e13 Gutenberg runs
    took 7.6-19.2M faults, and bench_speed.py's alternating steps put 800-4,700 a step on the plain MoE's and none
    on MoSE's, which made MoSE look up to 0.1 cheaper per FLOP than it is (RESULTS.md, "the page faults"). So
    (mallopt) blocks up to 32 MB come from the heap and its free top stays mapped: those runs now take 0.47-0.58M
    faults. Why trim at all: steps whose tensor sizes change (continuous widths, other recipes) leave holes the
    next step's sizes do not fit, and the heap grows by hundreds of MB; random_pair's exact shares
    (recipes.draw_mix) keep the sizes fixed. Trimming on growth, not on a clock, bounds the peak at `grow` times
    what a step holds however long the run, and trims only as often as that needs."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim, mallopt, page = libc.malloc_trim, libc.mallopt, os.sysconf("SC_PAGE_SIZE")
        open("/proc/self/statm").close()
    except (OSError, AttributeError, ValueError):   # macOS, Windows, musl: nothing to do
        return lambda: None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20) or mallopt(M_MMAP_THRESHOLD, 16 << 20)   # glibc's ceiling: 4 MB x sizeof(long)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)              # 1 GB, in effect never: trim_if_grown decides

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    limit = [0]

    def trim_if_grown():
        if resident() > limit[0]:
            if limit[0]:
                trim(0)
            limit[0] = grow * resident()
    return trim_if_grown


def report_lost_rank(rank, default=sys.excepthook):
    """An excepthook for DDP rank `rank` (sys.excepthook = report_lost_rank(rank)). When a rank dies, the others
    fail in their next collective: one line saying so rather than a traceback from inside the backend. The rank
    that died prints its own error (torchrun: 'Root Cause'); any other error goes to the default hook."""
    import torch

    def hook(kind, error, tb):
        if not (isinstance(error, torch.distributed.DistError) or
                (isinstance(error, RuntimeError) and any(s in str(error) for s in ("gloo", "NCCL", "Connection")))):
            return default(kind, error, tb)
        why = str(error).splitlines()[0]
        why = why.split("] ", 1)[-1] if why.startswith("[") else why   # drop the backend's source location
        prog = sys.argv[0].split("/")[-1] or "script"
        print(f"{prog}: rank {rank} stopped: another rank left the job ({why.split('. ')[0][:120]}); its own "
              f"error, printed by that rank, says why", file=sys.stderr)
    return hook


def first_non_finite(model, passes):
    """Where an inf or NaN is born, for a one-line stop: runs `passes` (a generator that runs one forward pass
    of model, then yields its label) with a hook on every module, and returns (module name, module type, label)
    for the first module, in the order modules finish, whose output holds a non-finite value while its inputs
    do not; None if every output is finite. Found where it is born even when that is outside any submodule's
    call: a Dropout after it would otherwise be blamed."""
    import torch
    first = []
    finite = lambda ts: all(torch.isfinite(t).all() for t in (ts if isinstance(ts, (tuple, list)) else (ts,))
                            if torch.is_tensor(t) and t.is_floating_point())

    def check(module, args, output):
        if not first and finite(args) and not finite(output):
            first.append(module)
    hooks = [m.register_forward_hook(check) for m in model.modules()]
    try:
        with torch.no_grad():
            for label in passes:
                if first:
                    names = {m: name or type(model).__name__ for name, m in model.named_modules()}
                    return names[first[0]], type(first[0]).__name__, label
    finally:
        for h in hooks:
            h.remove()
    return None


def stop_non_finite(model, passes, step, loss, grad_norm, widths, k, ckpt_path):
    """Fail with one line for a training step whose loss or gradients are not finite, stopped before its update:
    the step, its dials and where the inf or NaN is born (first_non_finite on the step's passes once more)."""
    found = first_non_finite(model, passes)
    rounded = lambda v: [rounded(x) for x in v] if isinstance(v, (list, tuple)) else \
        round(v, 4) if isinstance(v, float) else v   # a width is a float, a list or a policy
    where = (f"first non-finite output (from finite inputs) in {found[0]} ({found[1]}) at width {rounded(found[2])}"
             if found else f"every forward output is finite, the gradients are not (grad norm {grad_norm})")
    kept = f"{ckpt_path} (the last good checkpoint) is untouched" if os.path.exists(ckpt_path) else \
        "no checkpoint was saved"
    fail(f"non-finite training step {step} (loss {loss}, grad norm {grad_norm}), widths {rounded(widths)}, k {k}: "
         f"{where}; stopped before the update, {kept}. Lower --learning_rate, raise --warmup_iters or use "
         f"--dtype=float32")
