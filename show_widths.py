"""
See where the compute goes: the generated text coloured by the width each token's experts ran at.

    python sample.py --out_dir=out-shakespeare-mose --policy=confidence --budget=0.5 --show_widths
    python sample.py --out_dir=out-shakespeare-mose --policy=confidence --budget=0.5 --html=widths.html

A MoSE width policy gives every (token, expert) pair its own width (and top-p routing every token its own number
of experts), so at a budget the model spends more on some tokens than on others. sample.py (with --show_widths
or --html) hands model.generate a list, trace=, that receives each decoding step's stats, and keeps each
router's gates with a forward hook; this file reads them:

  recording    the trace and the gates of one generate() call, and each position's pairs out of them
  token_width  the one number a token is coloured by
  terminal     the text with ANSI colours (24-bit or 256), or plain text with a ⟨width⟩ after each token
  legend       the colour scale and what it shows
  page         the same as a self-contained HTML page: each token a <span>, its pairs in the tooltip

Which widths are a token's: those of the forward pass that *read* it (to predict the next token). The first step
reads the whole prompt (with or without the KV cache); every later step reads the token sampled before it (the
last position of its window). The last sampled token is never read, so it has no width and stays uncoloured, as
do prompt tokens older than the model's window (block_size). A token's width in a MoE layer is the mean over
its (token, expert) pairs that ran there: top-p routing may skip pairs (width 0), which do not count. The
colour is that mean averaged over the MoE layers, or one MoE layer's (sample.py --width_layer=N); with
sample.py --color_by=top it is the width of the token's most probable expert instead.

What to expect: the confidence policy (and ttt and search, which fit its gamma) shares a total width of
k * Gamma among a token's k experts, so a token's mean width stays at Gamma unless w_min or 1 clips a pair (a
confident router's second expert, clipped up to w_min, makes that token a little wider): its colour changes
little, while the split between its experts follows the router's confidence (the tooltips show it). Top-p
routing's savings are pairs that did not run, which a token's width leaves out; the tooltips give each token's
expert FLOPs, skipped pairs counted as 0. To see the router's confidence under the confidence policy, colour by
the most probable expert's width (--color_by=top): a sure token gives it most of the k * Gamma.

The colour scale is absolute, width 0 to 1 (blue, cyan, green, yellow, orange, red: narrow to wide), so pages at
different operating points compare directly and a uniform width is one colour everywhere; its hue changes every
eighth of the range, so widths a tenth apart look different.
"""

import contextlib
import html as _html
import json
import os

# -----------------------------------------------------------------------------
# which widths each token ran at


class Recording:
    """What one generate(trace=...) call leaves behind: trace (each step's stats) and gates (each MoE layer's
    router gates, (N, k), one entry per router call, in call order)."""

    def __init__(self):
        self.trace, self.gates = [], []

    def pairs(self, n_tokens, row=0):
        """For each of the n_tokens positions of generate's output (prompt included): None if no forward pass read
        it, else one list per MoE layer of its k pairs (expert, width, gate), width = h / H (0: not run, top-p
        routing), gate None where the gates were not kept. row: the batch row."""
        out = [None] * n_tokens
        if not self.trace or not self.trace[0]["ran_width"]:
            return out                      # a dense model: no widths
        n_moe = len(self.trace[0]["ran_width"])
        gates = self.gates if len(self.gates) == n_moe * len(self.trace) else None   # e.g. a compiled model
        length = n_tokens - len(self.trace)   # the sequence length when the first step ran
        for s, stats in enumerate(self.trace):
            T = stats["ran_width"][0].size(1)
            end = length + s                  # this step read positions end - T .. end - 1
            widths = [w[row].float().cpu().tolist() for w in stats["ran_width"]]        # per layer (T, k)
            experts = [e[row].cpu().tolist() for e in stats["experts"]]
            if gates:
                B = stats["ran_width"][0].size(0)
                g = [x.float().view(B, T, -1)[row].cpu().tolist() for x in gates[s * n_moe:(s + 1) * n_moe]]
            for j in range(0 if s == 0 else T - 1, T):    # the prompt at the first step, then the last position
                out[end - T + j] = [[(e, w, g[m][j][i] if gates else None)
                                     for i, (e, w) in enumerate(zip(experts[m][j], widths[m][j]))]
                                    for m in range(n_moe)]
        return out


@contextlib.contextmanager
def recording(model):
    """with recording(model) as rec: model.generate(..., trace=rec.trace). Hooks on the routers keep their gates
    for the tooltips (generate's stats carry widths and experts, not gates); they are removed on exit."""
    rec = Recording()
    routers = [block.mlp.router for block in model.transformer.h if hasattr(block.mlp, "router")]
    hooks = [r.register_forward_hook(lambda module, args, out: rec.gates.append(out.gates.detach()))
             for r in routers]
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()


def token_compute(pairs):
    """The token's expert FLOPs as a fraction of full width at the k used: the sum of its pairs' widths (skipped
    pairs: 0) over the number of pairs, all MoE layers together (a pair's FLOPs are proportional to its width)."""
    return sum(w for layer_pairs in pairs for _, w, _ in layer_pairs) / sum(len(lp) for lp in pairs)


def token_width(pairs, layer=None, by="mean"):
    """The width a token is coloured by: per MoE layer the mean width of its pairs that ran (width > 0), or with
    by="top" the width of its most probable expert (the first pair: the router lists them most probable first),
    averaged over the MoE layers, or MoE layer `layer`'s alone. None for a token with no width."""
    if pairs is None:
        return None
    means = []
    for layer_pairs in (pairs if layer is None else [pairs[layer]]):
        ran = [w for _, w, _ in (layer_pairs[:1] if by == "top" else layer_pairs) if w > 0]
        if ran:
            means.append(sum(ran) / len(ran))
    return sum(means) / len(means) if means else None


# -----------------------------------------------------------------------------
# colours


RAMP = ((0.0, (48, 70, 190)), (0.125, (60, 130, 235)), (0.25, (80, 195, 230)), (0.375, (110, 220, 150)),
        (0.5, (200, 232, 90)), (0.625, (250, 204, 60)), (0.75, (245, 135, 50)), (0.875, (220, 62, 50)),
        (1.0, (140, 20, 60)))   # width -> background (r, g, b), linear between the stops: blue (narrow) to red (wide)
CUBE = (0, 95, 135, 175, 215, 255)   # the channel levels of xterm's 256-colour cube (colours 16..231)
RESET, UNDERLINE = "\x1b[0m", "\x1b[4m"


def colour(w):
    """The background (r, g, b) for a width w in [0, 1]."""
    w = min(max(float(w), 0.0), 1.0)
    for (w0, c0), (w1, c1) in zip(RAMP, RAMP[1:]):
        if w <= w1:
            t = (w - w0) / (w1 - w0)
            return tuple(round(a + t * (b - a)) for a, b in zip(c0, c1))


def ink(rgb):
    """Black text on a light background, white on a dark one."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def hex_colour(rgb):
    return "#%02x%02x%02x" % rgb


def ansi(rgb, truecolor):
    """The escape code for a width's background and its text colour: 24-bit, or the nearest of the 256 colours."""
    fg = ink(rgb)
    if truecolor:
        return "\x1b[48;2;%d;%d;%d;38;2;%d;%d;%dm" % (*rgb, *fg)
    cube = lambda c: 16 + sum(m * min(range(6), key=lambda i: abs(CUBE[i] - v)) for m, v in zip((36, 6, 1), c))
    return f"\x1b[48;5;{cube(rgb)};38;5;{cube(fg)}m"


def terminal_colours(stream):
    """(color, truecolor) for a stream: colours only on a terminal, never with NO_COLOR set (no-color.org) or
    TERM=dumb; 24-bit where COLORTERM says so, else 256 colours."""
    color = stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    return color, os.environ.get("COLORTERM", "").lower() in ("truecolor", "24bit")


# -----------------------------------------------------------------------------
# the terminal


def terminal(pieces, pairs, n_prompt, layer=None, color=False, truecolor=False, by="mean"):
    """The text, one piece per token. color: each token on its width's background, the prompt underlined, a newline
    drawn as a coloured ↵ before the break. Plain: ⟨w⟩ after each token (⟨-⟩: no width), ⟦ ⟧ around the prompt,
    ↵ before a newline."""
    out = []
    for i, (text, p) in enumerate(zip(pieces, pairs)):
        w = token_width(p, layer, by)
        if color:
            style = ("" if w is None else ansi(colour(w), truecolor)) + (UNDERLINE if i < n_prompt else "")
            lines = text.split("\n")
            for j, line in enumerate(lines):
                shown = line + ("↵" if j < len(lines) - 1 else "")
                out.append(f"{style}{shown}{RESET}" if style and shown else shown)
                if j < len(lines) - 1:
                    out.append("\n")
        else:
            body = text.rstrip("\n")
            breaks = len(text) - len(body)
            out.append(("⟦" if i == 0 and n_prompt else "") + body.replace("\n", "↵\n") + "↵" * breaks +
                       ("⟨-⟩" if w is None else f"⟨{w:.2f}⟩") + ("⟧" if i == n_prompt - 1 else "") + "\n" * breaks)
    return "".join(out)


def describe(all_pairs, n_moe, layer=None, route_top_p=False, by="mean"):
    """What the colour shows, and the widths it took (one width only: say that it is one colour)."""
    what = ("the width (h/H) of its most probable expert " if by == "top" else
            "the mean width (h/H) of its (token, expert) pairs that ran ") + (
        f"in MoE layer {layer}" if layer is not None else "in the model's one MoE layer" if n_moe == 1 else
        f"in a MoE layer, averaged over the {n_moe} MoE layers")
    skipped = " (pairs skipped by top-p routing, width 0, do not count)" if route_top_p else ""
    shown = [w for pairs in all_pairs for w in (token_width(p, layer, by) for p in pairs) if w is not None]
    distinct = sorted({round(w, 4) for w in shown})
    if not distinct:
        seen = "no token has a width"
    elif len(distinct) == 1:
        seen = f"one colour everywhere: every token ran at width {distinct[0]:.2f}"
    else:
        seen = f"widths from {distinct[0]:.2f} to {distinct[-1]:.2f}, mean {sum(shown) / len(shown):.2f}"
    return what + skipped, seen


def legend(all_pairs, n_moe, layer=None, color=False, truecolor=False, point="", route_top_p=False, by="mean"):
    """The lines printed under the text: the colour scale (or the marker), what it shows, the operating point.
    (sample.py prints the FLOPs spent right after.)"""
    what, seen = describe(all_pairs, n_moe, layer, route_top_p, by)
    if color:
        scale = " ".join(f"{ansi(colour(w), truecolor)} {w:.2f} {RESET}" for w in (0.25, 0.5, 0.75, 1.0))
        lines = [f"width scale, narrow to wide: {scale}; {seen}",
                 f"each token's colour: {what}; underlined: the prompt; uncoloured: no width (the last token is "
                 f"sampled but never read)"]
    else:
        lines = [f"widths: each token is followed by ⟨w⟩, {what}; {seen}",
                 "⟦ ⟧: the prompt; ↵: a newline; ⟨-⟩: no width (the last token is sampled but never read)"]
    return "\n".join(lines + [f"operating point: {point}"] if point else lines)


# -----------------------------------------------------------------------------
# the HTML page

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #111; background: #fff; max-width: 1100px; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 15px; margin: 20px 0 6px; font-weight: 600; }
.summary, .note { font-size: 13px; line-height: 1.5; margin: 4px 0; }
.scale { display: flex; align-items: flex-start; gap: 8px; font-size: 12px; margin: 10px 0 22px; }
.bar { position: relative; width: 320px; height: 14px; border: 1px solid #999;
       background: linear-gradient(to right, %s); }
.bar i { position: absolute; top: 17px; transform: translateX(-50%%); font-style: normal; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 16px; line-height: 1.7;
        white-space: pre-wrap; overflow-wrap: anywhere; }
.text .p { text-decoration: underline; text-decoration-thickness: 2px; }
.text .none { outline: 1px dashed #888; }
.nl::before { content: "\\21B5"; opacity: 0.6; }
"""


def tooltip(text, position, prompt, pairs, layer, n_moe, by="mean"):
    lines = [f"{json.dumps(text, ensure_ascii=False)} at position {position}" + (" (prompt)" if prompt else "")]
    w = token_width(pairs, layer, by)
    if w is None:
        lines.append("no width: no forward pass read this token (the last one is sampled but never read)")
        return "\n".join(lines)
    lines.append(f"width {w:.3f}" + (f" (MoE layer {layer})" if layer is not None else
                                    f" (mean over {n_moe} MoE layers)" if n_moe > 1 else "") +
                 f"; expert FLOPs {100 * token_compute(pairs):.0f} % of full width")
    for m, layer_pairs in enumerate(pairs):
        run = [f"expert {e} " + (f"at {x:.2f}" if x > 0 else "skipped (top-p)") +
               (f", gate {g:.2f}" if g is not None else "") for e, x, g in layer_pairs]
        lines.append(f"MoE layer {m}: " + "; ".join(run))
    return "\n".join(lines)


def spans(pieces, pairs, n_prompt, layer, n_moe, by="mean"):
    out = []
    for i, (text, p) in enumerate(zip(pieces, pairs)):
        w = token_width(p, layer, by)
        classes = ["p"] if i < n_prompt else []
        if w is None:
            classes.append("none")
            style = ""
        else:
            rgb = colour(w)
            style = f' style="background:{hex_colour(rgb)};color:{hex_colour(ink(rgb))}"'
        body = '<span class="nl"></span>\n'.join(_html.escape(line, quote=False) for line in text.split("\n"))
        title = _html.escape(tooltip(text, i, i < n_prompt, p, layer, n_moe, by)).replace("\n", "&#10;")
        cls = f' class="{" ".join(classes)}"' if classes else ""
        out.append(f'<span{cls}{style} title="{title}">{body}</span>')
    return "".join(out)


def page(samples, n_moe, layer=None, point="", reference="", route_top_p=False, by="mean"):
    """A self-contained HTML page (no scripts, no external files). samples: dicts with pieces (one string per
    token), pairs (Recording.pairs), n_prompt and spent (a line of text)."""
    what, seen = describe([s["pairs"] for s in samples], n_moe, layer, route_top_p, by)
    esc = _html.escape
    stops = ", ".join(f"{hex_colour(c)} {100 * w:g}%" for w, c in RAMP)
    ticks = "".join(f'<i style="left:{100 * w:g}%">{w:g}</i>' for w in (0, 0.25, 0.5, 0.75, 1))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>nanoMoSE: where the compute goes</title>", f"<style>{STYLE % stops}</style></head><body>",
             "<h1>Where the compute goes: each token coloured by the width its experts ran at</h1>",
             f'<p class="summary"><b>operating point:</b> {esc(point)}</p>' if point else "",
             f'<p class="summary"><b>reference:</b> {esc(reference)}</p>' if reference else "",
             "".join(f'<p class="summary"><b>sample {i + 1}:</b> {esc(s["spent"])}</p>'
                     for i, s in enumerate(samples) if s.get("spent")),
             f'<div class="scale"><span>narrow</span><div class="bar">{ticks}</div><span>wide</span>'
             f'<span>&nbsp;{esc(seen)}</span></div>',
             f'<p class="note">A token\'s colour is {esc(what)}. Underlined: the prompt. Dashed outline: no width '
             f'(the last token is sampled but never read). ↵ marks a newline. Hover over a token for its width in '
             f'each MoE layer, its experts and their gates.</p>']
    for i, s in enumerate(samples):
        parts.append(f"<h2>sample {i + 1}</h2>" if len(samples) > 1 else "")
        parts.append(f'<div class="text">{spans(s["pieces"], s["pairs"], s["n_prompt"], layer, n_moe, by)}</div>')
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)
