"""
Config as plain Python, nanoGPT style, with the sharp edges filed off. A script declares its defaults as
module-level globals, then calls

    configure(globals())

Each argument without '=' is a config file (Python) that assigns some of those globals; each --key=value
overrides one. Values are parsed as Python literals (falling back to a string) and must have the type of the
default (an int is accepted for a float, "1.0,0.5" or a single number for a tuple). An unknown key or a wrong
type stops the script with one line that says what to fix.

setup_device() turns the two system keys every script shares, device and dtype, into a checked device and
the autocast context to run the model under.
"""

import ast
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
            if not sep:
                fail(f"'{arg}' needs a value: --{key}=VALUE")
            key = (aliases or {}).get(key, key)   # e.g. --json= for json_path (a key 'json' would shadow the module)
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
