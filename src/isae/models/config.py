"""Configuration of the SAE family and of training, and the presets: the one source of
their names and defaults.

A preset is data: a dict of switches. An architecture name is a preset followed by switches
added (``+name``) or removed (``-name``), e.g. ``topk+signed`` or ``isae-tied`` — which is
how the ablation names its variants; ``parse_arch`` is the one reader of such names.
``+iterN`` adds N hard-thresholding steps (``+iter`` alone adds 3), e.g. ``topk+iter10`` or
``isae+iter1``; ``+sg`` stops the gradient through those steps (``isae-iter+sg``, see
``SAEConfig.iht_gradient``). A change that changes nothing (``isae-iter-sg``: isae-iter has
no ``sg`` to remove) is refused, so that every name means one model and no name reads as
something it is not.

Every field carries its docstring (the string under it); ``isae train`` makes its flags
from the fields, their defaults and those docstrings (isae.cli.fields).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real

from isae.errors import UserError

#: Sanity bounds, far beyond any model in the study (the largest hidden size of today's
#: language models is ~2^14, the largest published SAEs have ~2^25 latents): what lies
#: outside comes from a corrupt file or a typo, and would otherwise allocate terabytes
#: or run for ever.
MAX_D_IN = 1 << 17
MAX_WIDTH = 1 << 26
MAX_ENCODER_STEPS = 1000
MAX_SEED = (1 << 63) - 1
#: Optimiser steps of one run: at ten thousand steps a second, three weeks.
MAX_STEPS = 1 << 34


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi], or a UserError naming ``name`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise UserError(f"{name} must be an integer, not {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UserError(f"{name} must be {bound}, got {value}")
    return value


def check_float(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (or (lo, hi]), or a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{name} must be a number, not {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise UserError(f"{name} is too large: {value!r}") from None
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = ("> " if lo_open else ">= ") + f"{lo:g}" + ("" if hi == math.inf else f" and <= {hi:g}")
        raise UserError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_device(device) -> str:
    """A device name torch understands and this machine has; UserError otherwise."""
    import torch

    if not isinstance(device, str):
        raise UserError(f"device must be a string such as cpu or cuda, not {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return device

#: The switches, each independent. Values are what ``+name`` sets; ``-name`` sets the default.
SWITCHES: dict[str, tuple[str, object, object]] = {
    # name: (field, value when added, value when removed)
    "signed": ("signed", True, False),
    "tied": ("tied", True, False),
    "nobias": ("bias", "none", "learned"),
    "iter": ("encoder_steps", 3, 0),
}

#: Switches that qualify another rather than stand alone (not part of the ablation's "each
#: switch alone"), in the same form: ``sg`` needs thresholding steps (``iter``) to act on.
MODIFIERS: dict[str, tuple[str, object, object]] = {
    "sg": ("iht_gradient", "final", "steps"),
}

#: Presets: one dict of fields each, in the order tables list them. ``dl`` is the classical
#: reference, not an SAE.
PRESETS: dict[str, dict] = {
    "topk": dict(kind="topk", signed=False, tied=False, bias="learned", encoder_steps=0,
                 iht_gradient="steps"),
    "relu": dict(kind="relu", signed=False, tied=False, bias="learned", encoder_steps=0,
                 iht_gradient="steps"),
    "isae": dict(kind="topk", signed=True, tied=True, bias="none", encoder_steps=0,
                 iht_gradient="steps"),
    "isae-iter": dict(kind="topk", signed=True, tied=True, bias="none", encoder_steps=3,
                      iht_gradient="steps"),
    "dl": dict(kind="dl", signed=True, tied=True, bias="none", encoder_steps=0,
                 iht_gradient="steps"),
}

#: Names that label a checkpoint without being an architecture one trains, with the fields
#: they fix: a synthetic set's true dictionary (its ``truth/`` folder, encoded by OMP).
LABELS: dict[str, dict] = {
    "truth": dict(kind="dl", signed=True, tied=True, bias="none", encoder_steps=0,
                  iht_gradient="steps"),
}

_TOKEN = re.compile(r"([+-])([a-z]+)(\d*)")


@dataclass(frozen=True)
class Arch:
    """An architecture name, read."""

    name: str
    preset: str
    """The preset it starts from."""
    changes: str
    """The switches added (+name) or removed (-name) after the preset, as written; "" for
    a preset itself."""
    fields: dict
    """The SAEConfig fields of this variant (kind and switches)."""


def parse_arch(name: str) -> Arch:
    """``"isae-tied"`` -> Arch("isae-tied", "isae", "-tied", fields). Raises UserError on
    unknown parts."""
    base = max((p for p in PRESETS if name == p or name.startswith(p + "+") or name.startswith(p + "-")),
               key=len, default=None)
    if base is None:
        raise UserError(
            f"unknown arch {name!r}: a preset ({', '.join(PRESETS)}) followed by +switch or "
            f"-switch ({', '.join([*SWITCHES, *MODIFIERS])})"
        )
    spec = dict(PRESETS[base])
    rest = name[len(base):]
    pos = 0
    for m in _TOKEN.finditer(rest):
        if m.start() != pos:
            break
        sign, switch, count = m.groups()
        known = {**SWITCHES, **MODIFIERS}
        if switch not in known:
            raise UserError(f"unknown switch {switch!r} in arch {name!r}; known: {', '.join(known)}")
        if spec["kind"] != "topk":
            raise UserError(f"arch {name!r}: switches apply to TopK-family presets only")
        fname, on, off = known[switch]
        if count:
            if switch != "iter" or sign != "+" or int(count) < 1:
                raise UserError(
                    f"arch {name!r}: only +iterN takes a count (N >= 1 thresholding steps)"
                )
            on = int(count)
        value = on if sign == "+" else off
        if spec[fname] == value:
            hint = f"; did you mean {name.replace('-' + switch, '+' + switch, 1)}?" if sign == "-" else ""
            raise UserError(f"arch {name!r}: {sign}{switch}{count} changes nothing "
                            f"({name[:len(base) + m.start()]} already has {fname} = {value!r}){hint}")
        spec[fname] = value
        pos = m.end()
    if pos != len(rest):
        raise UserError(f"cannot parse arch {name!r} after {name[:len(base) + pos]!r}")
    if spec.get("iht_gradient") == "final" and not spec["encoder_steps"]:
        raise UserError(f"arch {name!r}: +sg stops the gradient through thresholding steps, "
                        "and it has none (add +iter or +iterN)")
    return Arch(name, base, rest, spec)


def arch_fields(name: str) -> dict:
    """The fields an architecture name fixes (kind and switches): ``parse_arch``'s, or a
    label's (LABELS). UserError for an unknown name."""
    if name in LABELS:
        return dict(LABELS[name])
    return parse_arch(name).fields


def contradiction(name: str, fields: dict) -> str | None:
    """Why ``fields`` (some of kind and the switches) contradict the architecture ``name``,
    in one line; None when they agree. UserError for an unknown name."""
    want = arch_fields(name)
    wrong = [k for k in want if k in fields and fields[k] != want[k]]
    if not wrong:
        return None
    says = ", ".join(f"{k}={want[k]!r}" for k in wrong)
    got = ", ".join(f"{k}={fields[k]!r}" for k in wrong)
    if wrong == ["encoder_steps"]:
        hint = steps_hint(name, fields["encoder_steps"])
    else:
        hint = "name the variant instead: a preset with +switch/-switch, e.g. isae-tied"
    return f"arch {name!r} means {says}, not {got} (the name decides these; {hint})"


def steps_hint(name: str, n: int) -> str:
    """How to ask for ``n`` thresholding steps on architecture ``name``: by its name."""
    if arch_fields(name)["kind"] != "topk":
        return f"{name} runs no thresholding steps (they refine TopK codes)"
    # The name without its step switches (isae-iter is isae with 3 steps), plus +iterN.
    named = re.sub(r"[+-]iter\d*", "", name) + (f"+iter{n}" if n else "")
    want = {**arch_fields(name), "encoder_steps": n}
    try:
        ok = parse_arch(named).fields == want
    except UserError:
        ok = False
    if not ok:
        named = f"{name}+iter{n}" if n else f"{name}-iter"
    return f"ask for the steps by name: {named}"


def arch_help() -> str:
    """What an architecture name may be, in one line (for help texts)."""
    return (f"a preset ({', '.join(PRESETS)}) with optional +switch/-switch "
            f"({', '.join([*SWITCHES, *MODIFIERS])}; +iterN for N thresholding steps, +sg for no gradient "
            "through them), e.g. topk+signed, isae-tied, isae+iter10 or isae-iter+sg")


def thresholding_steps(name: str) -> tuple[str, int] | None:
    """An arch read as a base plus N hard-thresholding steps: ``isae-iter`` -> ("isae", 3),
    ``topk+iter10`` -> ("topk", 10), ``topk+iter`` -> ("topk", 3), ``topk`` -> ("topk", 0);
    None for anything else (other switches, unknown names)."""
    try:
        arch = parse_arch(name)
    except UserError:
        return None
    n = int(arch.fields["encoder_steps"])
    if arch.fields["kind"] != "topk":
        return None
    if name == "isae-iter":
        return "isae", n
    if name in PRESETS:
        return (name, 0) if n == 0 else None
    if arch.preset == "isae-iter" or not re.fullmatch(r"\+iter\d*", arch.changes):
        return None
    return arch.preset, n


@dataclass
class SAEConfig:
    """Shape and architecture of one sparse coder."""

    d_in: int
    """Dimension of the activations."""
    d_sae: int
    """Number of latents (dictionary atoms), the width."""
    k: int = 32
    """Active latents per row (TopK family, dl); for relu only a label of the sweep."""
    arch: str = "topk"
    """Architecture name: preset plus switches (see parse_arch). It fixes the six fields
    below (kind and the switches, iht_gradient last): left unset they are derived from it, and a config whose
    fields contradict it is refused."""
    kind: str | None = field(default=None, metadata={"choices": ("topk", "relu", "dl")})
    """topk | relu | dl: how codes are computed."""
    signed: bool | None = None
    """Keep the k largest |pre-activations| with their signs instead of ReLU then TopK."""
    tied: bool | None = None
    """W_enc is W_dec transposed: one parameter."""
    bias: str | None = field(default=None, metadata={"choices": ("learned", "none")})
    """learned: b_dec and b_enc are trained; none: both fixed at zero (data is centred)."""
    encoder_steps: int | None = None
    """Iterative hard-thresholding steps with the decoder after the amortised TopK."""
    iht_step: float = 1.0
    """Step size eta of those steps, relative to 1/||D||^2 on the active rows (see sparse_coder.py)."""
    iht_gradient: str | None = field(default=None, metadata={"choices": ("steps", "final")})
    """What training differentiates when there are thresholding steps. steps: through every
    step (isae-iter). final (the ``+sg`` switch, e.g. isae-iter+sg): the steps run without
    gradient and compute the same codes, and the loss has two terms. The FVU of the final
    codes, as constants: it trains the decoder, a dictionary-learning update (by the
    envelope theorem the exact gradient of the refined codes' loss where they are
    least-squares optimal on their support). And the FVU of the amortised TopK codes before
    the steps, differentiated as TopK training differentiates it (Gao et al.): it trains the
    encoder, with the feedback that the steps' codes cannot give it, and the decoder too.
    A straight-through gradient instead (the final values' gradient passed to the
    pre-activations of their support) has no such feedback, since those codes come from the
    steps and not from the pre-activations: in CPU tests it drove training unstable."""
    l1_coeff: float = 1e-3
    """relu only: weight of the decoder-norm-weighted L1 penalty."""
    seed: int = 0
    """Initialisation seed."""

    def __post_init__(self) -> None:
        # Types first: a checkpoint's cfg.json reaches here as parsed JSON.
        if not isinstance(self.arch, str):
            raise UserError(f"arch must be a string, not {self.arch!r}")
        for name, value in arch_fields(self.arch).items():  # the switches the name fixes
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("kind", "bias", "iht_gradient"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a string, not {getattr(self, name)!r}")
        for name in ("signed", "tied"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.kind not in choices(SAEConfig, "kind"):
            raise UserError(f"unknown kind {self.kind!r}")
        self.d_in = check_int("d_in", self.d_in, 1, MAX_D_IN)
        self.d_sae = check_int("the width (d_sae)", self.d_sae, 1, MAX_WIDTH)
        self.k = check_int("k", self.k, 1)
        if not 1 <= self.k < self.d_sae:
            raise UserError(f"k must satisfy 1 <= k < width; got k={self.k}, width={self.d_sae}")
        if self.bias not in choices(SAEConfig, "bias"):
            raise UserError(f"bias must be 'learned' or 'none', not {self.bias!r}")
        if self.iht_gradient not in choices(SAEConfig, "iht_gradient"):
            raise UserError(f"iht_gradient must be 'steps' or 'final', not {self.iht_gradient!r}")
        self.encoder_steps = check_int("encoder_steps", self.encoder_steps, 0, MAX_ENCODER_STEPS)
        self.iht_step = check_float("iht_step", self.iht_step, 0.0, lo_open=True)
        self.l1_coeff = check_float("l1_coeff", self.l1_coeff, 0.0)
        self.seed = check_int("seed", self.seed, 0, MAX_SEED)
        # Last, once every field has its type: a config cannot contradict its name.
        why = contradiction(self.arch, asdict(self))
        if why is not None:
            raise UserError(why)

    @classmethod
    def from_arch(cls, arch: str, **kw) -> SAEConfig:
        """The config of architecture ``arch`` (its switches derived from the name)."""
        return cls(arch=arch, **kw)

    def to_dict(self) -> dict:
        """The fields as cfg.json keeps them; ``iht_gradient`` only where it is not "steps"
        (``+sg``), so that the checkpoints of every other architecture keep the keys and
        bytes they had before the field existed (and are found again as finished runs)."""
        d = asdict(self)
        if d["iht_gradient"] == "steps":
            del d["iht_gradient"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


BASE_LR = 8e-4
"""The default learning rate at width 2^14; it scales as 1 / sqrt(width) (TrainConfig.lr)."""
SPARSIFY_BASE_LR = 2e-4
"""EleutherAI sparsify's (and Gao et al.'s) Adam rate at width 2^14, scaled the same way."""
LOG_ROWS = 200
"""Rows of train_log.parquet a run writes when log_every is left at None."""


@dataclass
class TrainConfig:
    """How one sparse coder is trained."""

    tokens: int = 2_000_000
    """Training rows to consume (epochs over the set repeat with a new shuffle)."""
    batch_size: int = 1024
    """Rows per optimiser step. At a fixed token budget the number of steps matters as much
    as the tokens: in benchmarks/defaults_sweep.py (1.5 M rows), batch 1024 recovered the
    true dictionary better than 2048 or 4096 at the same lr and as well as 512 at half the
    steps. A larger batch wants a higher lr."""
    lr: float | None = None
    """Adam learning rate; None = base_lr / sqrt(width / 16384)."""
    base_lr: float = BASE_LR
    """The rate at width 16384 that an unset lr scales by 1 / sqrt(width / 16384). 8e-4 is
    4 x the width-scaled rate of Gao et al. / sparsify (2e-4): in benchmarks/defaults_sweep.py
    4 x beat 1 x for topk and isae on every shape, and was the most robust of 1, 4, 8 and
    16 x."""
    warmup_frac: float = 0.02
    """Fraction of steps with a linear learning-rate warmup."""
    decay: str = field(default="linear", metadata={"choices": ("linear", "cosine", "constant")})
    """Decay after warmup: linear (to 0 over the last 20%), cosine, or constant. Linear:
    in benchmarks/defaults_sweep.py it recovered the truth as well as constant with a lower
    held-out FVU; cosine was worse on both."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead latents (topk kind)."""
    auxk_norm: str = field(default="residual", metadata={"choices": ("residual", "input")})
    """What AuxK's squared error is divided by. residual (Gao et al.): the residual's own
    variance, so AuxK is the FVU of the residual by the dead latents' decode; input
    (EleutherAI sparsify): the batch's total variance, times min(dead / k_aux, 1), a weight
    that falls as the coder improves and when few latents are dead."""
    auxk_detach: str = field(default="none",
                             metadata={"choices": ("none", "tied", "signed", "all")})
    """Which coders' AuxK codes carry no gradient, so that AuxK moves only the dead latents'
    decoder rows: none (Gao et al.), tied (tied coders only: in benchmarks/dead_latents.py,
    AuxK's gradient through a tied coder's codes made a quarter of isae's latents at 16 x d
    never fire), signed (coders with signed codes, tied or not: over 400 000 rows the same
    harness found the same for untied isae-tied, 23 % against 0.02 % detached, but over
    40 M tokens on a GPU it lost 41 % detached, so untied signed coders want auxk_fit
    instead; untied unsigned topk needs the gradient, 27 % dead without it), all (what
    EleutherAI sparsify's fused encoder does)."""
    auxk_fit: str = field(default="none", metadata={"choices": ("none", "signed", "all")})
    """Which coders' AuxK decode is scaled row by row by its least-squares fit to the
    residual, the scale without gradient, so that where the dead latents' decode overshoots
    the residual AuxK's gradient turns their codes rather than shrinking them: none (Gao et
    al.), signed (coders with signed codes), all. A coder whose AuxK codes are detached
    (auxk_detach) is left as it is: the fit acts on the codes' gradient. In
    benchmarks/dead_latents.py (6 144 latents on MiniLM) untied isae-tied lost 37 % of its
    latents with AuxK's gradient, 13 % detached and 0.3 % fitted, at the same FVU
    (benchmarks/dead_latents_tied.md); on a GPU at 12 288 latents and 40 M tokens, 0.04 %
    fitted against 41 % detached (results-gpu/width/fit-32/)."""
    auxk_skip: str = field(default="none", metadata={"choices": ("none", "iter")})
    """Which coders train without AuxK (its weight 0 for them alone, so that one option can
    serve a group of architectures): none, or iter (coders with thresholding steps: at
    12 288 latents on MiniLM, AuxK left 24 % of isae-iter's latents dead and none died
    without it, at a lower FVU; benchmarks/RESULTS.md, eleventh GPU session)."""
    dead_tokens: int = 200_000
    """A latent that has not fired for this many training rows counts as dead."""
    shuffle_buffer: int = 65536
    """Rows held in the shuffle buffer; memory does not grow with the set."""
    log_every: int | None = None
    """Optimiser steps between rows of train_log.parquet. Unset: about 200 rows per run,
    short or long, enough for the convergence control to smooth."""
    converged_below: float = 0.03
    """The convergence control's threshold: a run has converged when its smoothed training
    FVU moved by less than this fraction (relative, either way) over the 20 % of steps
    before the final linear decay (the last 20 % for the other schedules). A run above it
    gets a warning on stderr and ``converged: false`` in cfg.json and its summary."""
    checkpoint_every: int = 200
    """Optimiser steps between resume-state saves."""
    checkpoint_seconds: float = 60.0
    """Least wall seconds between resume-state saves (and before the first): a save waits for
    the first multiple of checkpoint_every steps after them. On a GPU 200 steps can take
    under a second, and a state of nine SAEs at 32 x d is about 1 GB (0.6-1.1 s to write on
    the CPU), so saving every 200 steps spent a run's time writing states; a crash now loses
    at most about this much work. 0: every checkpoint_every steps."""
    device: str = "cpu"
    """cpu | cuda | cuda:N."""
    data_on_device: str = field(default="auto", metadata={"choices": ("auto", "always", "never")})
    """Where batches come from. auto: the training split is copied once onto a CUDA device,
    in its stored dtype, when it fits in data_memory_fraction of the device's free memory,
    and streamed from disk otherwise (always on the CPU); always: copied, on any device;
    never: streamed through the shuffle buffer. The two sources order the rows differently."""
    data_memory_fraction: float = 0.5
    """auto only: the largest share of the device's free memory the training split may take
    (the rest stays for the models, their steps and their CUDA graphs)."""
    seed: int = 0
    """Seed of the data order (shuffle) and of dead-atom resampling."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance stored in cfg.json."""

    def __post_init__(self) -> None:
        self.tokens = check_int("--tokens", self.tokens, 1)
        self.batch_size = check_int("--batch-size", self.batch_size, 1)
        if self.total_steps() > MAX_STEPS:
            raise UserError(f"--tokens {self.tokens} at --batch-size {self.batch_size} makes "
                            f"{self.total_steps():.3g} optimiser steps, more than any run can "
                            f"take (at most {MAX_STEPS:.3g}): lower --tokens or raise --batch-size")
        if self.lr is not None:
            self.lr = check_float("--lr", self.lr, 0.0, lo_open=True)
        self.warmup_frac = check_float("--warmup-frac", self.warmup_frac, 0.0, 1.0)
        if self.decay not in choices(TrainConfig, "decay"):
            raise UserError(f"decay must be linear, cosine or constant, not {self.decay!r}")
        self.base_lr = check_float("--base-lr", self.base_lr, 0.0, lo_open=True)
        self.auxk_alpha = check_float("--auxk-alpha", self.auxk_alpha, 0.0)
        if self.auxk_norm not in choices(TrainConfig, "auxk_norm"):
            raise UserError(f"auxk_norm must be residual or input, not {self.auxk_norm!r}")
        if self.auxk_detach not in choices(TrainConfig, "auxk_detach"):
            raise UserError(f"auxk_detach must be none, tied, signed or all, not {self.auxk_detach!r}")
        if self.auxk_fit not in choices(TrainConfig, "auxk_fit"):
            raise UserError(f"auxk_fit must be none, signed or all, not {self.auxk_fit!r}")
        if self.auxk_skip not in choices(TrainConfig, "auxk_skip"):
            raise UserError(f"auxk_skip must be none or iter, not {self.auxk_skip!r}")
        self.dead_tokens = check_int("--dead-tokens", self.dead_tokens, 1)
        self.shuffle_buffer = check_int("--shuffle-buffer", self.shuffle_buffer, 1)
        if self.log_every is not None:  # None: about LOG_ROWS rows, whatever the length
            self.log_every = check_int("--log-every", self.log_every, 1)
        self.converged_below = check_float("--converged-below", self.converged_below, 0.0,
                                           lo_open=True)
        self.checkpoint_every = check_int("--checkpoint-every", self.checkpoint_every, 1)
        self.checkpoint_seconds = check_float("--checkpoint-seconds", self.checkpoint_seconds, 0.0)
        self.device = check_device(self.device)
        self.seed = check_int("--seed", self.seed, 0, MAX_SEED)
        if self.data_on_device not in choices(TrainConfig, "data_on_device"):
            raise UserError(f"data_on_device must be auto, always or never, not {self.data_on_device!r}")
        if not 0 < self.data_memory_fraction <= 1:
            raise UserError(f"data_memory_fraction must be in (0, 1], not {self.data_memory_fraction}")

    @classmethod
    def from_recipe(cls, recipe: str, **fields) -> TrainConfig:
        """The settings of a named recipe (RECIPES), then ``fields`` over them."""
        if recipe not in RECIPES:
            raise UserError(f"unknown training recipe {recipe!r}; known: {', '.join(RECIPES)}")
        return cls(**{**RECIPES[recipe], **fields})

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a checkpoint's recorded ``train`` settings (other keys, such as the batch
        source, are not fields and are left out)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def auxk_detaches(self, sae: SAEConfig) -> bool:
        """Whether AuxK's codes carry no gradient for this coder (``auxk_detach``)."""
        return (self.auxk_detach == "all" or (self.auxk_detach == "tied" and sae.tied)
                or (self.auxk_detach == "signed" and sae.signed))

    def auxk_fits(self, sae: SAEConfig) -> bool:
        """Whether AuxK's decode is fitted to the residual for this coder (``auxk_fit``):
        never where its AuxK codes are detached."""
        wants = self.auxk_fit == "all" or (self.auxk_fit == "signed" and sae.signed)
        return wants and not self.auxk_detaches(sae)

    def auxk_alpha_for(self, sae: SAEConfig) -> float:
        """AuxK's weight for this coder: auxk_alpha, or 0 where ``auxk_skip`` names it."""
        skip = self.auxk_skip == "iter" and sae.encoder_steps > 0
        return 0.0 if skip else self.auxk_alpha

    def total_steps(self) -> int:
        """Optimiser steps of a run: the tokens in whole batches, at least one."""
        return max(math.ceil(self.tokens / self.batch_size), 1)

    def log_interval(self, total_steps: int) -> int:
        """Steps between log rows for a run of ``total_steps`` steps."""
        if self.log_every is not None:
            return self.log_every
        return max(total_steps // LOG_ROWS, 1)

    def decay_start(self, total_steps: int) -> int:
        """First step of the linear decay, which takes the last 20 % of the steps."""
        return int(0.8 * total_steps)

    def learning_rate(self, d_sae: int) -> float:
        """The Adam learning rate for a coder of ``d_sae`` latents (see ``lr``)."""
        return self.lr if self.lr is not None else self.base_lr / (d_sae / 2**14) ** 0.5


#: Training recipes: a recipe is data, the TrainConfig fields it sets (the rest keep their
#: defaults). What each does to dead latents at 32 x d is measured in benchmarks/RESULTS.md
#: ("Dead latents at 32 x d") and by benchmarks/width_bench.py.
RECIPES: dict[str, dict] = {
    # isae train's defaults.
    "isae": {},
    # AuxK on every latent silent for 20 000 rows, not 200 000: at the study's rates, wide
    # coders leave many latents firing once in 20 000 to 200 000 rows, alive to a 200 000-row
    # window and never seen on 100 000 held-out rows; AuxK then pulls them back in. A tied
    # coder's AuxK moves its dead atoms as decoder rows only: through its codes, AuxK made
    # those atoms rarer still.
    "live": {"dead_tokens": 20_000, "auxk_detach": "tied"},
    # The study's recipe at 16 and 32 x d (config/gpu.yaml's per_width options): today's
    # window, tied coders' AuxK codes detached. isae-iter lost 24 % of its latents with it at
    # 32 x d on MiniLM (benchmarks/RESULTS.md, tenth GPU session); width_bench trains it
    # beside the others to see which ingredient does that.
    "detached": {"auxk_detach": "tied"},
    # No AuxK at all: whether AuxK itself kills latents (its loss rose to 4-5 as isae-iter's
    # latents died at 32 x d, against about 1 where none died).
    "noaux": {"auxk_alpha": 0.0},
    # EleutherAI sparsify's Adam recipe: its rate, its AuxK (normalised by the batch's
    # variance, codes without gradient as in its fused encoder) and its 10 M-row dead window
    # (k_aux d / 2, auxk_alpha 1 / 32 and the unit-norm decoder with its gradient
    # projection are isae's too).
    "sparsify": {"base_lr": SPARSIFY_BASE_LR, "dead_tokens": 10_000_000, "auxk_norm": "input",
                 "auxk_detach": "all"},
}


def carry_lr(lr: float, from_width: int, to_width: int) -> float:
    """A learning rate chosen at ``from_width`` latents, carried to ``to_width`` as the
    default rate scales (1 / √width): the same multiple of the default at both widths.
    ``lr`` itself at the same width."""
    return lr if from_width == to_width else lr * (from_width / to_width) ** 0.5


def choices(cls: type, name: str) -> tuple:
    """The values field ``name`` of dataclass ``cls`` allows (its ``choices`` metadata)."""
    return next(f.metadata["choices"] for f in fields(cls) if f.name == name)
