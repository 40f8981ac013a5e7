"""Held-out reconstruction metrics.

All in the checkpoint's normalised space: MSE per dimension, FVU (against the held-out
mean), mean L0, and the fraction of latents never active on the held-out rows.
"""

from __future__ import annotations

import torch

from isae.data.activations import ActivationSet
from isae.data.checkpoints import Checkpoint
from isae.errors import UserError
from isae.progress import progress


def reconstruction_metrics(ckpt: Checkpoint, acts: ActivationSet, batch_size: int = 4096) -> dict:
    """-> dict(rows, mse_per_dim, fvu, l0, dead_frac), streamed over held-out shards."""
    return reconstruction_and_fired(ckpt, acts, batch_size)[0]


@torch.no_grad()
def reconstruction_and_fired(ckpt: Checkpoint, acts: ActivationSet, batch_size: int = 4096,
                             max_rows: int | None = None) -> tuple[dict, torch.Tensor]:
    """(reconstruction_metrics' dict, [N] bool CPU mask of the latents that fired on some
    held-out row: the live latents, whose complement is ``dead_frac``). ``max_rows``: the
    first held-out rows only (None: all)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, not {batch_size!r}")
    if acts.d != ckpt.d_in:
        raise UserError(f"activation set has d={acts.d}, checkpoint {ckpt.path} has d_in={ckpt.d_in}")
    model = ckpt.model
    dev = model.device
    n = 0
    sse = 0.0
    s1 = torch.zeros(acts.d, dtype=torch.float64, device=dev)
    s2 = 0.0
    nnz = 0
    fired = torch.zeros(ckpt.d_sae, dtype=torch.bool, device=dev)
    total = acts.meta.get("heldout_rows")
    if max_rows is not None and total is not None:
        total = min(total, max_rows)
    with progress(total, desc="eval held-out rows", unit="row") as bar:
        for part in acts.iter_shards("heldout"):
            if max_rows is not None:
                if n >= max_rows:
                    break
                part = {"x": part["x"][: max_rows - n]}
            for i in range(0, len(part["x"]), batch_size):
                x = ckpt.normalize(torch.from_numpy(part["x"][i : i + batch_size]).to(dev))
                codes = model.encode(x)
                x_hat = model.decode(codes)
                sse += float((x - x_hat).double().pow(2).sum())
                xd = x.double()
                s1 += xd.sum(0)
                s2 += float(xd.pow(2).sum())
                active = codes.val != 0
                nnz += int(active.sum())
                fired[codes.idx[active]] = True
                n += x.shape[0]
            bar.update(len(part["x"]))
    if n == 0:
        raise UserError(f"activation set {acts.path} has no held-out rows")
    total_var = s2 - float(s1 @ s1) / n
    return {
        "rows": n,
        "mse_per_dim": sse / (n * acts.d),
        "fvu": sse / total_var if total_var > 0 else float("nan"),
        "l0": nnz / n,
        # counted, not averaged in float32: a fraction like 1/48 must be exact
        "dead_frac": 1.0 - int(fired.sum()) / fired.numel(),
    }, fired.cpu()


def same_supports(a, b, n_atoms: int) -> torch.Tensor:
    """(Codes [B, K_a], Codes [B, K_b]) -> [B] bool: the rows whose nonzero latents are the
    same set in both."""
    def sorted_support(c) -> torch.Tensor:
        return torch.where(c.val != 0, c.idx, n_atoms).sort(-1).values

    sa, sb = sorted_support(a), sorted_support(b)
    width = max(sa.shape[1], sb.shape[1])
    sa = torch.nn.functional.pad(sa, (0, width - sa.shape[1]), value=n_atoms)
    sb = torch.nn.functional.pad(sb, (0, width - sb.shape[1]), value=n_atoms)
    return (sa == sb).all(-1)


@torch.no_grad()
def compare_with(ckpt: Checkpoint, other, acts: ActivationSet, max_rows: int | None = None,
                 batch_size: int = 4096) -> dict:
    """The checkpoint against another coder on raw activations (e.g. what a library computes
    from its export, ``isae.data.export.target_coder``), on held-out rows.

    ``other``: anything with ``encode(x) -> Codes`` and ``decode(Codes) -> x_hat`` on raw
    rows. -> dict(rows, fvu, fvu_other, same_support: fraction of rows whose active latents
    are the same set in both).
    """
    if acts.d != ckpt.d_in:
        raise UserError(f"activation set has d={acts.d}, checkpoint {ckpt.path} has d_in={ckpt.d_in}")
    dev = ckpt.model.device
    other = other.to(dev)
    n, sse, sse_o, same = 0, 0.0, 0.0, 0
    s1 = torch.zeros(acts.d, dtype=torch.float64, device=dev)
    s2 = 0.0
    for part in acts.iter_shards("heldout"):
        if max_rows is not None and n >= max_rows:
            break
        for i in range(0, len(part["x"]), batch_size):
            x = torch.from_numpy(part["x"][i : i + batch_size]).to(dev, torch.float32)
            if max_rows is not None:
                x = x[: max_rows - n]
            if not len(x):
                break
            c = ckpt.encode_raw(x)
            c_o = other.encode(x)
            sse += float((x - ckpt.reconstruct_raw(x)).double().pow(2).sum())
            sse_o += float((x - other.decode(c_o)).double().pow(2).sum())
            same += int(same_supports(c, c_o, ckpt.d_sae).sum())
            xd = x.double()
            s1 += xd.sum(0)
            s2 += float(xd.pow(2).sum())
            n += x.shape[0]
    if n == 0:
        raise UserError(f"activation set {acts.path} has no held-out rows")
    total_var = s2 - float(s1 @ s1) / n
    nan = float("nan")
    return {
        "rows": n,
        "fvu": sse / total_var if total_var > 0 else nan,
        "fvu_other": sse_o / total_var if total_var > 0 else nan,
        "same_support": same / n,
    }


def describe(ckpt: Checkpoint) -> dict:
    """The identifying columns every per-checkpoint table starts with."""
    c = ckpt.cfg
    return {
        "ckpt": str(ckpt.path),
        "arch": c.get("arch"),
        "k": c.get("k"),
        "width": c.get("d_sae"),
        "seed": c.get("seed"),
        "tokens": c.get("tokens_seen"),
    }



def encode_flops_parts(kind: str, d: int, n: int, k: int, encoder_steps: int = 0) -> tuple[int, int]:
    """Floating-point operations to encode one row, as (matrix products, the rest).

    A multiply-add counts 2. Counted: the encoder's dense product, each hard-thresholding
    step's decodes, correlations and error checks (isae.models.sparse_coder.iht_step), and
    orthogonal matching pursuit's correlations, Gram systems and refits (reference.omp).
    Selections (top-k, argmax) and O(N) elementwise work are not counted: they do not
    multiply with d. ``kind``: topk | relu | dl.
    """
    if kind in ("topk", "relu"):
        mm = 2 * d * n  # pre-activations x W_enc
        rest = 0
        for _ in range(encoder_steps):
            mm += 2 * d * n  # the residual's correlation with every atom, r W_decᵀ
            # decode of the current code, of the step direction g_S, and of the new code
            # (2kd each); residual, step size and the two errors compared (~6d + 4k)
            rest += 3 * 2 * k * d + 6 * d + 4 * k
        return mm, rest
    if kind == "dl":
        mm = rest = 0
        for t in range(1, k + 1):
            mm += 2 * d * n  # correlation of the residual with every atom
            mm += 2 * t * t * d + 2 * t * d + 2 * t * d  # Gram of the support, D_S x, the refit
            rest += (2 * t**3) // 3 + d  # the t x t solve, the residual
        return mm, rest
    raise ValueError(f"unknown kind {kind!r}")


def encode_flops(kind: str, d: int, n: int, k: int, encoder_steps: int = 0) -> int:
    """Floating-point operations per row of the encoder (see encode_flops_parts)."""
    return sum(encode_flops_parts(kind, d, n, k, encoder_steps))
