"""
Config as plain Python, nanoGPT style, with the sharp edges filed off. A script declares its defaults as
module-level globals, then calls

    configure(globals())

Each argument without '=' is a config file (Python) that assigns some of those globals; each --key=value
overrides one. Values are parsed as Python literals (falling back to a string) and must have the type of the
default (an int is accepted for a float, "1.0,0.5" or a single number for a tuple). An unknown key or a wrong
type stops the script with one line that says what to fix.
"""

import ast
import sys


def fail(msg):
    prog = sys.argv[0].split("/")[-1] or "script"
    sys.exit(f"{prog}: {msg}")


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


def configure(defaults, argv=None):
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
            exec(source, {}, values)   # config files are trusted Python, as in nanoGPT
            items = [(k, v) for k, v in values.items()   # skip imports, helpers and _private names
                     if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                fail(f"'{arg}' needs a value: --{key}=VALUE")
            items = [(key, parse(text))]
            print(f"Overriding: {key} = {text}")
        for key, value in items:
            if key not in known:
                close = [k for k in sorted(known) if key.split("_")[0] in k][:6]
                fail(f"unknown config key '{key}'" + (f" (did you mean one of: {', '.join(close)}?)" if close else ""))
            defaults[key] = coerce(key, value, defaults[key])
    return {k: defaults[k] for k in sorted(known)}
