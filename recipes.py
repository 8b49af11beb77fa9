"""
The training recipes: how each training step chooses the widths (and the k) it trains, the counterpart of
dials.py, which chooses them at inference. train.py reads its config into a Recipe, then once a step calls
sample_widths and sample_k, and for every forward pass width_of and k_of. Every draw comes from a generator
that train.py seeds alike on every rank, so all ranks draw the same.

Widths (width_sampling), with what a step costs in forward + backward passes over the step's batch (a pass at a
narrower width costs less: only its experts' FLOPs shrink, attention and the rest stay as they are):

  random_pair   1 pass    every (token, expert) pair draws its own width (RandomWidth) by width_mix (else the
                          full width with probability p_full, else uniform in [w_min, 1] on the grid), each pass
                          in the law's exact shares (draw_mix: why); the shipped recipe, with train.py's
                          width_mix (a quarter at each grid width) and p_sequence 0.5
  max_random    1 + n     the MoSE paper: the full width, then n = n_random_widths random widths (draw_step_width)
  sandwich      2 + n     slimmable networks: the widest, the narrowest (w_min), n random widths between
  fixed         len       every width of fixed_widths, widest first
  random_step   1 pass    one width for the whole pass: the full width with probability p_full, else a random one
  none          1 pass    the full width alone: a plain MoE

  width_mix               the law of every random width above, stated: one probability per grid width, widest
                          first, e.g. (0.3, 0.1, 0.2, 0.4) for 1 / 0.75 / 0.5 / 0.25; the first is the full width's
                          share, so p_full is unused. () = p_full, else uniform snapped (the grid's end points then
                          get half an inner point's share). Why: to tilt the draws toward the narrow widths, which
                          lag the models trained for their size the most
  p_sequence > 0          random_pair: that share of each pass's sequences draws ONE width (by the same law) for
                          all its pairs in every MoE layer: "every expert narrow", what a uniform-width dial
                          evaluates and per-pair draws almost never show (a token's 4 pairs, k = 2 in two MoE layers,
                          are all at 0.25 for 0.25^4 of the tokens under a quarter each, 0.125^4 under p_full's
                          snapped law). The other sequences
                          keep per-pair widths; a pass costs what its widths spend, as any random_pair pass
  distill_weight > 0      in-place distillation (distill_loss): the passes after the first also learn the widest
                          pass's predictions; free for the others, random_pair gains a full-width teacher (2 passes)
  width_data='fresh'      each pass on a batch of its own (more text per step, the same passes; 'same': one batch)
  detach_router           only the first, widest pass trains the router's weights (train.py switches them)

Experts per token (k_sampling, Matryoshka MoE) add no pass, they change what each pass costs:

  layer         each MoE layer its own k ~ U{k_min .. k_max}
  capacity      each MoE layer its own k, P(k) proportional to k^(1 / k_tau): larger k more often
  step          one k for every layer
  micro         one k per micro-batch
  top_p         each token takes experts by probability until their mass reaches route_top_p (the router
                decides, at least 1, at most k_max; the paper: a mass of 0.1 of 96 experts)

Elastic MoE's co-activation sampling (k_pool: k experts drawn from a token's top-k_pool) happens inside the
router's forward, so it lives in model.py (Router.coactivation_sample); train.py passes k_pool to every pass.
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from model import WidthPolicy, check_width

WIDTH_SAMPLING = ("random_pair", "max_random", "sandwich", "fixed", "random_step", "none")
K_SAMPLING = ("none", "layer", "capacity", "step", "micro", "top_p")


@dataclass(frozen=True)
class Recipe:
    """train.py's recipe keys (its config section says what each one means) and what the model fixes."""
    width_sampling: str
    p_full: float
    w_min: float
    width_mix: tuple          # () or one probability per grid_widths(w_min, width_grid)
    p_sequence: float
    n_random_widths: int
    width_grid: float
    fixed_widths: tuple
    width_per_layer: bool
    distill_weight: float
    width_data: str
    detach_router: bool
    k_sampling: str
    k_min: int
    k_max: int                # k_exp where the config says 0
    k_tau: float
    route_top_p: float
    k_pool: int
    seed: int
    n_exp: int                # the model's
    k_exp: int
    n_moe_layers: int

    @classmethod
    def of(cls, config, model_config, given=()):
        """The recipe of train.py's config (a dict) for a model of GPTConfig model_config. Raises ValueError
        with a one-line message where the keys do not make a recipe. A dense GPT trains one full-width pass.
        given: the keys set on the command line (--p_full cannot change a width_mix's full-width share)."""
        if config["width_mix"] and "p_full" in given:
            raise ValueError("--p_full is unused with a width_mix: its first entry is the full width's share "
                             "(drop --p_full, or give --width_mix=())")
        model = dict(n_exp=model_config.n_exp, k_exp=model_config.k_exp, n_moe_layers=model_config.n_moe_layers)
        keys = [f.name for f in fields(cls) if f.name not in model]
        recipe = cls(**{k: config[k] for k in keys if k != "k_max"}, k_max=config["k_max"] or model_config.k_exp,
                     **model)
        if model_config.n_exp == 0:   # no dials to train
            return replace(recipe, width_sampling="none", k_sampling="none", k_pool=0, detach_router=False)
        return recipe

    def __post_init__(self):
        for key, ok, what in (("p_full", 0 <= self.p_full <= 1, "a probability in [0, 1]"),
                              ("p_sequence", 0 <= self.p_sequence <= 1, "a share of sequences in [0, 1]"),
                              ("width_grid", 0 <= self.width_grid <= 1, "in [0, 1] (0 = continuous)"),
                              ("route_top_p", 0 < self.route_top_p <= 1, "a probability mass in (0, 1]"),
                              ("k_tau", self.k_tau > 0, "> 0"), ("k_min", self.k_min >= 1, ">= 1"),
                              *((k, getattr(self, k) >= 0, ">= 0") for k in ("k_max", "k_pool", "n_random_widths",
                                                                             "distill_weight"))):
            if not ok:   # in train.py's words: --key=value set it
                raise ValueError(f"--{key} must be {what}, got {getattr(self, key)!r}")
        if self.width_sampling not in WIDTH_SAMPLING:
            raise ValueError(f"width_sampling must be one of {', '.join(WIDTH_SAMPLING)}, got '{self.width_sampling}'")
        if self.width_data not in ("same", "fresh"):
            raise ValueError(f"width_data must be same or fresh, got '{self.width_data}'")
        if self.width_data == "fresh" and self.distill_weight > 0:
            raise ValueError("in-place distillation needs every width on the same batch: use width_data='same'")
        if self.k_sampling not in K_SAMPLING:
            raise ValueError(f"k_sampling must be one of {', '.join(K_SAMPLING)}, got '{self.k_sampling}'")
        if self.k_sampling == "top_p" and (self.k_min != 1 or self.k_pool):
            raise ValueError("k_sampling='top_p' gives each token 1 to k_max experts by probability: leave k_min at "
                             "1 and k_pool at 0")
        one_pass = self.width_sampling in ("random_step", "none") or \
            self.width_sampling == "random_pair" and not self.distill_weight
        if self.detach_router and one_pass:
            raise ValueError(f"detach_router acts on the passes after the first, and width_sampling="
                             f"'{self.width_sampling}' has one pass: use max_random, sandwich or fixed")
        if self.width_sampling == "fixed" and not self.fixed_widths:
            raise ValueError("width_sampling='fixed' trains the widths in fixed_widths: give at least one, e.g. "
                             "--fixed_widths=1.0,0.5")
        check_width(self.w_min, "w_min")
        check_mix(self.width_mix, self.w_min, self.width_grid)
        # p_sequence, like p_full, is left unused by the recipes it does not act on: a baseline's config inherits it
        for w in self.fixed_widths:
            check_width(w, "fixed_widths values")
        if self.n_exp and not 1 <= self.k_min <= self.k_max <= self.n_exp:
            raise ValueError(f"need 1 <= k_min <= k_max <= n_exp, got k_min={self.k_min}, k_max={self.k_max}, "
                             f"n_exp={self.n_exp}")
        if self.n_exp and self.k_pool and not self.k_exp < self.k_pool <= self.n_exp:
            raise ValueError(f"k_pool must be in (k_exp, n_exp] = ({self.k_exp}, {self.n_exp}], got {self.k_pool}")


# -----------------------------------------------------------------------------
# widths


def grid_widths(w_min, grid):
    """The widths a width_mix gives probabilities to, widest first: 1, the multiples of grid between w_min and
    1, and w_min (the widths snapping can produce, and the full width). E.g. (1, 0.75, 0.5, 0.25) for the
    defaults; (1, 0.75, 0.5, 0.3) for w_min = 0.3."""
    inner = [round(i * grid, 10) for i in range(math.floor(w_min / grid), math.ceil(1 / grid) + 1)]
    return tuple(sorted({1.0, w_min} | {w for w in inner if w_min < w < 1}, reverse=True))


def check_mix(width_mix, w_min, grid):
    """A width_mix that makes a law over grid_widths ((): p_full's law, snapped): a ValueError of one line if not."""
    if not width_mix:
        return
    if not grid:
        raise ValueError("--width_mix gives each grid width a probability: set --width_grid > 0 (e.g. 0.25), or "
                         "--width_mix=() for continuous widths")
    widths = grid_widths(w_min, grid)
    if len(width_mix) != len(widths):
        raise ValueError(f"--width_mix needs one probability per grid width, widest first: {len(widths)} for "
                         f"{', '.join(f'{w:g}' for w in widths)} (w_min={w_min:g}, width_grid={grid:g}); got "
                         f"{len(width_mix)}")
    if any(not isinstance(p, (int, float)) or isinstance(p, bool) or not p >= 0 for p in width_mix):
        raise ValueError(f"--width_mix values are probabilities, each >= 0; got {width_mix}")
    if abs(sum(width_mix) - 1) > 1e-6:
        raise ValueError(f"--width_mix must sum to 1 (it is the law of every random width); got {width_mix}, "
                         f"which sums to {sum(width_mix):.6g}")


def draw_mix(width_mix, shape, gen):
    """Indices into width_mix of `shape`, each drawn by the law width_mix, in exact shares: n evenly spaced points
    (one random offset) through the inverse CDF give index i floor or ceil of n p_i of the draws, then a random
    permutation places them. Each draw alone still has the law width_mix. Why exact: a pass then runs the same
    number of rows at each width every step, so its tensors keep their sizes and the C heap reuses their
    memory; with independent draws the sizes change every step, the heap fragments and a run spends its time
    in malloc and page faults (RESULTS.md, "memory": what the exact shares save)."""
    cdf = torch.tensor(width_mix, dtype=torch.float64).cumsum(0) / sum(width_mix)
    cdf[max(i for i, p in enumerate(width_mix) if p > 0):] = 1.0   # never past the last width of probability > 0
    n = math.prod(shape)
    u = (torch.rand((), generator=gen).double() + torch.arange(n, dtype=torch.float64)) / n     # (n,)
    i = torch.searchsorted(cdf, u, right=True)
    return (i[torch.randperm(n, generator=gen)] if n > 1 else i).view(shape)


class RandomWidth(WidthPolicy):
    """The training policy of width_sampling='random_pair': every (token, expert) pair draws its own width by
    width_mix, one probability per grid_widths(w_min, grid), widest first (the shipped recipe: train.py's
    width_mix, a quarter each, and p_sequence 0.5). Without a width_mix: the full width with probability
    p_full, else u ~ U[w_min, 1] snapped to the nearest point of `grid` (0: continuous); snapping gives the
    grid's two end points half the share of the inner points, so this class's own defaults draw 1 / 0.75 /
    0.5 / 0.25 37.5 / 25 / 25 / 12.5 % of the time (`mix` computes it). One pass trains many widths at once,
    at less than the cost of a full-width step, and shows the model the mixed widths the confidence policy
    uses at inference. On a grid each call draws its pairs in the law's exact shares (draw_mix), so a pass's
    tensors keep their sizes; each pair alone still has the law. Draws come from `generator` (a CPU
    torch.Generator: a resumed run continues the same stream).

    p_sequence > 0: that share of the pass's sequences (seq_len consecutive tokens of the (B*T) flattened
    ones, as MoSELayer flattens them) runs one width, drawn by the same law, in all its pairs of every MoE
    layer (that share and those widths in exact shares too). Those widths are drawn once per forward pass, at its
    first MoE layer (moe_index 0), and kept for the others: one RandomWidth is one pass (width_of makes one per
    pass and micro-batch)."""

    def __init__(self, p_full=0.25, w_min=0.25, grid=0.25, generator=None, width_mix=(), p_sequence=0.0,
                 seq_len=None):
        check_width(w_min, "w_min")
        check_mix(width_mix, w_min, grid)
        if not 0 <= p_sequence <= 1:
            raise ValueError(f"p_sequence must be a share of sequences in [0, 1], got {p_sequence}")
        self.p_full, self.w_min, self.grid, self.generator = float(p_full), float(w_min), float(grid), generator
        self.width_mix, self.p_sequence, self.seq_len = tuple(float(p) for p in width_mix), float(p_sequence), seq_len
        self.sequences = None   # this pass's (which sequences run one width, that width), drawn at moe_index 0

    def draw(self, shape):
        """Widths of `shape` by the law of one pair (float32, on the CPU): on a grid in the mix's exact shares
        (draw_mix), continuous widths each drawn alone."""
        if self.grid:
            widths, law = zip(*self.mix().items())
            return torch.tensor(widths)[draw_mix(law, shape, self.generator)]
        u = torch.rand((2, *shape), generator=self.generator)                 # (2, *shape)
        return torch.where(u[0] < self.p_full, 1.0, self.w_min + (1 - self.w_min) * u[1])

    def __call__(self, gates, moe_index):
        if not self.p_sequence:
            return self.draw(gates.shape).to(gates.device)                     # (N, k)
        (N, k), T = gates.shape, self.seq_len
        if not T or N % T:
            raise ValueError(f"p_sequence needs the length of the sequences of a pass's {N} tokens: give "
                             f"RandomWidth seq_len (width_of's), got {T}")
        if moe_index == 0 or self.sequences is None:   # a new pass: the same sequences' widths in every layer
            one = draw_mix((1 - self.p_sequence, self.p_sequence), (N // T,), self.generator).bool()
            self.sequences = (one, self.draw((int(one.sum()),)))
        one, width = self.sequences                                            # (N // T,), (sequences of one,)
        w = torch.empty(N // T, T, k)
        w[one] = width[:, None, None]
        w[~one] = self.draw((int((~one).sum()), T, k))                        # the other pairs, each its own
        return w.view(N, k).to(gates.device)

    def mix(self):
        """{width: probability} of what __call__ draws on the grid (None without one: the draw is continuous):
        width_mix where it is given. Else below p_full, w is uniform on [w_min, 1] then rounded: each grid point
        gets its rounding interval's share. A sequence of p_sequence's draws its one width by the same law."""
        g, lo = self.grid, self.w_min
        if self.width_mix:
            return {w: p for w, p in zip(grid_widths(lo, g), self.width_mix) if p > 0}
        if not g:
            return None
        mix = {1.0: self.p_full}
        for i in range(math.floor(lo / g), math.ceil(1 / g) + 1):   # the grid points whose rounding interval
            a, b = max(lo, (i - 0.5) * g), min(1.0, (i + 0.5) * g)   # [i g - g/2, i g + g/2] meets [w_min, 1]
            w = round(min(1.0, max(lo, i * g)), 10)
            if b > a or lo == 1.0:
                mix[w] = mix.get(w, 0.0) + (1 - self.p_full) * ((b - a) / (1 - lo) if lo < 1 else 1.0)
        return {w: p for w, p in sorted(mix.items(), reverse=True) if p > 0}

    def __repr__(self):
        law = f"width_mix={self.width_mix}" if self.width_mix else f"p_full={self.p_full:g}"
        return f"RandomWidth({law}, w_min={self.w_min:g}, grid={self.grid:g}" + (
            f", p_sequence={self.p_sequence:g})" if self.p_sequence else ")")


def describe(recipe):
    """The line train.py prints at start-up for random_pair: what the recipe really draws (snapping skews a
    uniform draw; width_mix states it). None for the other recipes."""
    if recipe.width_sampling != "random_pair" or not recipe.n_exp:
        return None
    mix = RandomWidth(recipe.p_full, recipe.w_min, recipe.width_grid, width_mix=recipe.width_mix).mix()
    line = "random_pair: each (token, expert) pair draws its width, " + (
        ", ".join(f"{w:g} with probability {p:.3f}" for w, p in mix.items()) if mix else
        f"1 with probability {recipe.p_full:g}, else uniform in [{recipe.w_min:g}, 1]")
    return line + (f"; a share of {recipe.p_sequence:g} of the sequences draws one width (by the same law) for all "
                   f"its pairs in every MoE layer" if recipe.p_sequence else "")


def draw_step_width(recipe, gen):
    """One width for a whole pass (max_random, sandwich, random_step): U[w_min, 1], snapped to the grid, or
    by width_mix where it is given (the law of one RandomWidth pair, either way)."""
    if recipe.width_mix:
        return grid_widths(recipe.w_min, recipe.width_grid)[draw_mix(recipe.width_mix, (), gen).item()]
    u = recipe.w_min + (1 - recipe.w_min) * torch.rand((), generator=gen).item()
    if not recipe.width_grid:
        return u
    return min(1.0, max(recipe.w_min, round(u / recipe.width_grid) * recipe.width_grid))


def sample_widths(recipe, gen):
    """The widths trained this step, one forward/backward pass each; the widest comes first (it is the
    distillation teacher). A pass's width is a float, a list (one per MoE layer) or a RandomWidth."""
    if recipe.width_per_layer:
        rand = lambda: [draw_step_width(recipe, gen) for _ in range(recipe.n_moe_layers)]
    else:
        rand = lambda: draw_step_width(recipe, gen)
    if recipe.width_sampling == "none":
        return [1.0]
    if recipe.width_sampling == "random_step":   # the full width with probability p_full, else a random one
        if recipe.width_mix:                     # (width_mix states the full width's share itself)
            return [rand()]
        return [1.0 if torch.rand((), generator=gen).item() < recipe.p_full else rand()]
    if recipe.width_sampling == "random_pair":   # with distillation a full-width teacher pass comes first
        return [1.0] * (recipe.distill_weight > 0) + [RandomWidth(recipe.p_full, recipe.w_min, recipe.width_grid,
                                                                  width_mix=recipe.width_mix,
                                                                  p_sequence=recipe.p_sequence)]
    if recipe.width_sampling == "max_random":
        return [1.0] + [rand() for _ in range(recipe.n_random_widths)]
    if recipe.width_sampling == "sandwich":
        return [1.0, recipe.w_min] + [rand() for _ in range(recipe.n_random_widths)]
    return sorted(recipe.fixed_widths, reverse=True)


def width_of(recipe, width, step, micro_batch, seq_len=None):
    """A pass's width for one micro-batch (its index among all ranks' micro-batches of the step). A RandomWidth
    draws from a generator of the micro-batch's own, seeded by the step and that index: N processes draw exactly
    what one process with N times the gradient accumulation draws, and a resumed run what it would have drawn.
    seq_len: the micro-batch's sequence length (p_sequence gives whole sequences one width)."""
    if not isinstance(width, RandomWidth):
        return width
    g = torch.Generator().manual_seed(recipe.seed + 1_000_003 * step + micro_batch)
    return RandomWidth(width.p_full, width.w_min, width.grid, g, width.width_mix, width.p_sequence, seq_len)


def distill_loss(logits, teacher):
    """In-place distillation: cross-entropy of a narrower pass's logits against the widest pass's predictions
    (teacher: its logits, detached, float32). Added to the narrow pass's loss times distill_weight."""
    return -(F.softmax(teacher, -1) * F.log_softmax(logits.float(), -1)).sum(-1).mean()


# -----------------------------------------------------------------------------
# experts per token (Matryoshka MoE)


def sample_k(recipe, gen, n_micro_batches):
    """Experts per token this step, as forward's k_exp: one per MoE layer (layer, capacity), one for all layers
    (step), None for the training k, or the most a token may take (top_p). 'micro' draws one for each of the
    step's n_micro_batches, all ranks' (as train.py draws the data): k_of picks a micro-batch's."""
    draw = lambda: int(torch.randint(recipe.k_min, recipe.k_max + 1, (), generator=gen))
    if recipe.k_sampling == "layer":
        return [draw() for _ in range(recipe.n_moe_layers)]
    if recipe.k_sampling == "capacity":   # P(k) ∝ exp(log(k) / tau) = k^(1/tau): the larger k, the more often
        p = torch.arange(recipe.k_min, recipe.k_max + 1, dtype=torch.float64) ** (1 / recipe.k_tau)
        return (recipe.k_min + torch.multinomial(p, recipe.n_moe_layers, replacement=True, generator=gen)).tolist()
    if recipe.k_sampling == "micro":
        return [draw() for _ in range(n_micro_batches)]
    if recipe.k_sampling == "top_p":      # the router picks each token's k; k_max caps it
        return recipe.k_max
    return draw() if recipe.k_sampling == "step" else None


def k_of(recipe, ks, micro_batch):
    """The k_exp of one micro-batch (its index among all ranks'), from sample_k's draw for the step."""
    return ks[micro_batch] if recipe.k_sampling == "micro" else ks

