"""Configuration of the SAE family and of training, and the presets.

A preset is data: a dict of switches. An architecture name is a preset followed by switches
added (``+name``) or removed (``-name``), e.g. ``topk+signed`` or ``isae-tied`` — which is
how the ablation names its variants.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from isae.errors import UserError

#: The switches, each independent. Values are what ``+name`` sets; ``-name`` sets the default.
SWITCHES: dict[str, tuple[str, object, object]] = {
    # name: (field, value when added, value when removed)
    "signed": ("signed", True, False),
    "tied": ("tied", True, False),
    "nobias": ("bias", "none", "learned"),
    "iter": ("encoder_steps", 3, 0),
}

#: Presets: one dict of fields each. ``dl`` is the classical reference, not an SAE.
PRESETS: dict[str, dict] = {
    "topk": dict(kind="topk", signed=False, tied=False, bias="learned", encoder_steps=0),
    "relu": dict(kind="relu", signed=False, tied=False, bias="learned", encoder_steps=0),
    "isae": dict(kind="topk", signed=True, tied=True, bias="none", encoder_steps=0),
    "isae-iter": dict(kind="topk", signed=True, tied=True, bias="none", encoder_steps=3),
    "dl": dict(kind="dl", signed=True, tied=True, bias="none", encoder_steps=0),
}

_TOKEN = re.compile(r"([+-])([a-z]+)")


def parse_arch(name: str) -> dict:
    """``"isae-tied"`` -> the field dict of that variant. Raises UserError on unknown parts."""
    base = max((p for p in PRESETS if name == p or name.startswith(p + "+") or name.startswith(p + "-")),
               key=len, default=None)
    if base is None:
        raise UserError(
            f"unknown arch {name!r}: a preset ({', '.join(PRESETS)}) followed by +switch or "
            f"-switch ({', '.join(SWITCHES)})"
        )
    spec = dict(PRESETS[base])
    rest = name[len(base):]
    pos = 0
    for m in _TOKEN.finditer(rest):
        if m.start() != pos:
            break
        sign, switch = m.groups()
        if switch not in SWITCHES:
            raise UserError(f"unknown switch {switch!r} in arch {name!r}; known: {', '.join(SWITCHES)}")
        if spec["kind"] != "topk":
            raise UserError(f"arch {name!r}: switches apply to TopK-family presets only")
        fname, on, off = SWITCHES[switch]
        spec[fname] = on if sign == "+" else off
        pos = m.end()
    if pos != len(rest):
        raise UserError(f"cannot parse arch {name!r} after {name[:len(base) + pos]!r}")
    return spec


@dataclass
class SAEConfig:
    """Shape and architecture of one sparse coder."""

    d_in: int
    """Dimension of the activations."""
    d_sae: int
    """Number of latents (dictionary atoms), the width."""
    k: int
    """Active latents per row (TopK family, dl); for relu only a label of the sweep."""
    arch: str = "topk"
    """Architecture name: preset plus switches (see parse_arch)."""
    kind: str = "topk"
    """topk | relu | dl: how codes are computed."""
    signed: bool = False
    """Keep the k largest |pre-activations| with their signs instead of ReLU then TopK."""
    tied: bool = False
    """W_enc is W_dec transposed: one parameter."""
    bias: str = "learned"
    """learned: b_dec and b_enc are trained; none: both fixed at zero (data is centred)."""
    encoder_steps: int = 0
    """Iterative hard-thresholding steps with the decoder after the amortised TopK."""
    iht_step: float = 1.0
    """Step size eta of those steps, relative to 1/||D||^2 on the active rows (see sparse_coder.py)."""
    l1_coeff: float = 1e-3
    """relu only: weight of the decoder-norm-weighted L1 penalty."""
    seed: int = 0
    """Initialisation seed."""

    def __post_init__(self) -> None:
        if self.kind not in ("topk", "relu", "dl"):
            raise UserError(f"unknown kind {self.kind!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise UserError("d_in and the width must be positive")
        if not 1 <= self.k < self.d_sae:
            raise UserError(f"k must satisfy 1 <= k < width; got k={self.k}, width={self.d_sae}")
        if self.kind == "topk" and self.k > self.d_in and self.tied and self.signed:
            pass  # allowed: overcomplete codes; identifiability analysis will say what it costs
        if self.bias not in ("learned", "none"):
            raise UserError(f"bias must be 'learned' or 'none', not {self.bias!r}")
        if self.encoder_steps < 0:
            raise UserError("encoder_steps must be >= 0")

    @classmethod
    def from_arch(cls, arch: str, **kw) -> SAEConfig:
        return cls(arch=arch, **parse_arch(arch), **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


BASE_LR = 8e-4
"""The default learning rate at width 2^14; it scales as 1 / sqrt(width) (TrainConfig.lr)."""
LOG_ROWS = 200
"""Rows of train_log.parquet a run writes when log_every is left at None."""


@dataclass
class TrainConfig:
    """How one sparse coder is trained."""

    tokens: int = 2_000_000
    """Training rows to consume (epochs over the set repeat with a new shuffle)."""
    batch_size: int = 1024
    """Rows per optimiser step. At a fixed token budget a run's length in steps matters as
    much as its tokens: on the synthetic sets of benchmarks/defaults_sweep.py (1.5 M rows),
    batch 1024 (1465 steps) recovered the true dictionary better than 2048 or 4096 (733 or
    367 steps) at the same learning rate (tied with 2048 at 16 x), about as well as 512 at
    half its steps, and had the second-best worst case over shapes and archs. On a GPU at a
    large budget a bigger batch uses the device better; it wants a higher lr (in the sweep,
    batch 4096 did best at 16 x, not 4 x). paper.yaml sets its own."""
    lr: float | None = None
    """Adam learning rate; None = 8e-4 / sqrt(width / 16384): 4 x the width-scaled rate of
    Gao et al. / sparsify (``BASE_LR``). In the defaults sweep 4 x beat 1 x on every shape
    and arch and was the most robust of 1, 4, 8 and 16 x at batch 1024; higher rates helped
    the well-posed shape and hurt the coherent one."""
    warmup_frac: float = 0.02
    """Fraction of steps with a linear learning-rate warmup."""
    decay: str = "linear"
    """Decay after warmup: linear (to 0 over the last 20%), cosine, or constant. In the
    defaults sweep linear and constant recovered the truth equally and linear gave the
    lower held-out FVU; cosine was worse on both."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead latents (topk kind)."""
    dead_tokens: int = 200_000
    """A latent that has not fired for this many training rows counts as dead."""
    shuffle_buffer: int = 65536
    """Rows held in the shuffle buffer; memory does not grow with the set."""
    log_every: int | None = None
    """Optimiser steps between rows of train_log.parquet; None = total steps // LOG_ROWS
    (at least 1), so that every run, short or long, logs about LOG_ROWS rows: enough for
    the convergence control, which smooths the last 20 % of them."""
    converged_below: float = 0.03
    """The convergence control's threshold: a run has converged when its smoothed training
    FVU moved by less than this fraction (relative, either way) over the 20 % of steps
    before the final linear decay (the last 20 % for the other schedules). A run above it
    gets a warning on stderr and ``converged: false`` in cfg.json and its summary."""
    checkpoint_every: int = 200
    """Optimiser steps between resume-state saves."""
    device: str = "cpu"
    """cpu | cuda | cuda:N."""
    seed: int = 0
    """Seed of the data order (shuffle) and of dead-atom resampling."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance stored in cfg.json."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.batch_size < 1:
            raise UserError("tokens and batch size must be positive")
        if self.decay not in ("linear", "cosine", "constant"):
            raise UserError(f"decay must be linear, cosine or constant, not {self.decay!r}")
        if not self.converged_below > 0:
            raise UserError(f"converged_below must be positive, not {self.converged_below}")
        if self.log_every is not None and self.log_every < 1:
            raise UserError(f"log_every must be at least 1, not {self.log_every}")

    def log_interval(self, total_steps: int) -> int:
        """Steps between log rows for a run of ``total_steps`` steps."""
        if self.log_every is not None:
            return self.log_every
        return max(total_steps // LOG_ROWS, 1)

    def learning_rate(self, d_sae: int) -> float:
        """The Adam learning rate for a coder of ``d_sae`` latents (see ``lr``)."""
        return self.lr if self.lr is not None else BASE_LR / (d_sae / 2**14) ** 0.5
