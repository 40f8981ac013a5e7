"""Every measurement of a group of checkpoints trained together, in one pass.

The study trains the seeds and architectures of one configuration (dataset, k, width,
training tokens) in one job, and measures them in one job: held-out reconstruction,
convergence controls, encode cost, ground-truth recovery, restricted isometry, and the
matchings between runs. Held-out codes are computed once per checkpoint and shared by
every comparison that needs them.

Three tables come out (``GroupTables``):

* ``runs``: one row per checkpoint (identity, reconstruction, convergence, cost, truth
  recovery, restricted isometry with ``ric_`` prefixed columns);
* ``pairs``: one row per compared pair of checkpoints: ``kind = "seed"`` for two seeds of
  one architecture (dictionary stability and code consistency, over all latents and, with
  ``live_`` prefixed columns, over the latents live in both seeds, beside the chance level
  of that many random training rows, ``live_chance_data_rows``: isae.analysis.live),
  ``kind = "arch"`` for two architectures trained from the same seed (their initial
  dictionaries are the same, so a high match there and a low one across seeds says the
  dictionary is still its seed's);
* ``latents``: the matched |cos| of every latent of every seed pair (F1), and whether each
  member of the pair is live (``live_a``, ``live_b``).

A latent is live when it fires on some held-out row: every held-out row, the same rows as
the runs' ``dead_frac``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from isae.analysis.consistency import code_consistency
from isae.analysis.convergence import init_abs_cos, run_convergence
from isae.analysis.isometry import ric_report, row_supports
from isae.analysis.live import live_chance, live_summary
from isae.analysis.matching import match_dictionaries
from isae.analysis.reconstruction import describe, encode_flops, reconstruction_and_fired
from isae.analysis.truth import TRUE_CODE_COLUMNS, check_activations, has_true_codes
from isae.data.activations import ActivationSet, sample_rows
from isae.data.checkpoints import (
    CFG,
    INIT_FILE,
    TENSORS,
    TRAIN_LOG,
    Checkpoint,
    load,
    load_decoder,
    read_initial_decoder,
    read_train_log,
)
from isae.errors import UserError
from isae.models.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class GroupTables:
    runs: pd.DataFrame
    pairs: pd.DataFrame
    latents: pd.DataFrame


def find_checkpoints(paths: list[str | os.PathLike]) -> list[Path]:
    """Checkpoint folders among ``paths``: each path is a checkpoint, or a folder whose
    checkpoints (at any depth) are taken in sorted order. UserError when none is found."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / TENSORS).is_file() and (p / CFG).is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(c.parent for c in p.rglob(CFG) if (c.parent / TENSORS).is_file())
        else:
            raise UserError(f"{p} is neither a checkpoint nor a folder of checkpoints")
    if not found:
        raise UserError(f"no checkpoint under {', '.join(map(str, paths))}")
    return found


def convergence(ckpt: Checkpoint, threshold: float | None = None) -> dict:
    """The run's convergence controls from its train log and initial decoder: the control
    ``isae train`` states (isae.analysis.convergence.run_convergence: ``fvu_trend``, the
    relative fall of the smoothed training FVU over the 20 % of steps before the final
    learning-rate decay, ``trend_start`` / ``trend_end`` its window in steps, and
    ``converged``, |trend| under ``threshold``, the run's own ``converged_below`` when None),
    ``steps``, ``log_rows``, and ``init_abs_cos`` (mean |cos| of each atom with its own
    initial atom; NaN without init.safetensors)."""
    out = {"fvu_trend": np.nan, "trend_start": np.nan, "trend_end": np.nan, "converged": False,
           "steps": np.nan, "log_rows": 0, "init_abs_cos": np.nan}
    train = dict(ckpt.cfg.get("train") or {})
    tcfg = TrainConfig.from_dict(train)
    if threshold is not None:
        tcfg = dataclasses.replace(tcfg, converged_below=threshold)
    total_steps = tcfg.total_steps()
    out["steps"] = total_steps
    log_path = ckpt.path / TRAIN_LOG
    if log_path.is_file() and train:
        tl = read_train_log(ckpt.path)
        out["log_rows"] = len(tl)
        if len(tl):
            c = run_convergence(tl, tcfg, total_steps)
            out["fvu_trend"] = np.nan if c["fvu_trend"] is None else c["fvu_trend"]
            out["trend_start"], out["trend_end"] = c["fvu_trend_steps"]
            out["converged"] = c["converged"]
    init_path = ckpt.path / INIT_FILE
    if init_path.is_file():
        W0 = read_initial_decoder(ckpt.path)
        if tuple(W0.shape) != tuple(ckpt.W_dec.shape):
            raise UserError(f"{init_path}: W_dec has shape {list(W0.shape)}, the checkpoint's "
                            f"{list(ckpt.W_dec.shape)}")
        out["init_abs_cos"] = float(init_abs_cos(ckpt.W_dec.cpu().numpy(), W0.numpy()).mean())
    return out


def _identity(ckpt: Checkpoint) -> dict:
    row = describe(ckpt)
    row["lr"] = ckpt.cfg.get("lr")
    row["kind"] = ckpt.model.cfg.kind
    return row


def measure_group(
    paths: list[str | os.PathLike],
    activations: str | os.PathLike,
    *,
    max_rows: int | None = 10000,
    ric_pairs: int = 0,
    ric_seed: int = 0,
    cross_archs: list[str] | None = None,
    threshold: float | None = None,
    latents: bool = True,
    live_chance_rows: int = 100_000,
    chance_seed: int = 0,
    device: str = "cpu",
    batch_size: int = 4096,
) -> GroupTables:
    """Measure every checkpoint under ``paths`` (see the module docstring).

    ``max_rows``: held-out rows for codes (pairs, truth, restricted isometry; None = all);
    reconstruction always streams every held-out row. ``ric_pairs``: sampled pairs of rows
    for the restricted isometry (0 = skip it). ``cross_archs``: the architectures compared
    at equal seeds (dl is never among them: its first atoms come from the data, not from
    the seed). ``threshold``: the convergence control's (None: each run's own).
    ``live_chance_rows``: training rows the live chance level draws its random rows from
    (the first ones of the split, as ``isae chance --max-rows``; 0 = no live chance level);
    ``chance_seed``: its seed, one generator for the group's seed pairs in their order.
    """
    ckpt_paths = find_checkpoints(paths)
    acts = ActivationSet(activations)
    truth = has_true_codes(acts)
    data = acts.load("heldout", columns=list(TRUE_CODE_COLUMNS) if truth else [], max_rows=max_rows)
    W_true = load_decoder(acts.path / "truth") if truth else None
    if ric_pairs and len(data["x"]) < 2:
        raise UserError(f"{acts.path}: fewer than 2 held-out rows for the restricted isometry")

    runs, codes, decoders, live, keys = [], {}, {}, {}, []
    for path in ckpt_paths:
        ckpt = load(path, device=device)
        check_activations(acts, ckpt)
        row = _identity(ckpt)
        key = (row["arch"], row["seed"])
        if key in codes:
            raise UserError(f"two checkpoints of arch {key[0]} seed {key[1]} under the inputs")
        log.info("measuring %s", path)
        rec, fired = reconstruction_and_fired(ckpt, acts, batch_size)
        row.update(rec)
        live[key] = fired.numpy()
        row.update(convergence(ckpt, threshold))
        c = ckpt.model.cfg
        row["encode_flops"] = encode_flops(c.kind, c.d_in, c.d_sae, c.k, c.encoder_steps)
        z = ckpt.encode_raw(data["x"])
        codes[key] = (z.val.cpu(), z.idx.cpu())
        decoders[key] = ckpt.W_dec.cpu()
        if truth:
            m = match_dictionaries(ckpt.W_dec, W_true, device=device)
            s = m.summary()
            row.update({"truth_n_atoms": int(W_true.shape[0]),
                        "truth_abs_cos": s["mean_abs_cos"], "truth_frac_gt_0.9": s["frac_gt_0.9"],
                        "truth_frac_gt_0.7": s["frac_gt_0.7"], "truth_mmcs": s["mmcs_ab"]})
            # True codes live in raw units; the model's in its normalised space.
            z_true = (np.asarray(data["z_val"], np.float64) / float(ckpt.norm.scale),
                      np.asarray(data["z_idx"], np.int64))
            cons = code_consistency(codes[key], z_true, m).summary()
            row.update({f"truth_code_{k}": v for k, v in cons.items() if k != "rows"})
        if ric_pairs:
            S = row_supports(*codes[key], ckpt.d_sae)
            true_S = None
            if truth:
                true_S = (W_true, row_supports(data["z_val"], data["z_idx"], W_true.shape[0]))
            _, ric = ric_report(ckpt.W_dec, S, ric_pairs, ric_seed, k=c.k, truth=true_S,
                                device=device)
            row.update({f"ric_{k}": v for k, v in ric.items() if k not in ("k", "seed")})
        runs.append(row)
        keys.append(key)

    pool = _chance_rows(acts, live_chance_rows, chance_seed) if live_chance_rows else None
    gen = torch.Generator().manual_seed(chance_seed)
    pairs, lat = [], []
    by_arch: dict[str, list[int]] = {}
    for arch, seed in keys:
        by_arch.setdefault(arch, []).append(seed)
    for arch, seeds in by_arch.items():
        for sa, sb in itertools.combinations(sorted(seeds), 2):
            a, b = (arch, sa), (arch, sb)
            m = match_dictionaries(decoders[a], decoders[b], device=device)
            row = {"kind": "seed", "arch_a": arch, "arch_b": arch, "seed_a": sa, "seed_b": sb,
                   **m.summary()}
            row.update(live_summary(decoders[a], decoders[b], live[a], live[b], device=device,
                                    matching=m))
            row["live_chance_data_rows"] = _live_chance(row, acts.d, gen, pool, device)
            cons = code_consistency(codes[a], codes[b], m).summary()
            row.update({f"code_{k}": v for k, v in cons.items()})
            pairs.append(row)
            if latents:
                lat.append(pd.DataFrame({"arch": arch, "seed_a": sa, "seed_b": sb,
                                         "abs_cos": m.abs_cos, "live_a": live[a][m.a],
                                         "live_b": live[b][m.b]}))
    kinds = {r["arch"]: r["kind"] for r in runs}
    cross = [a for a in (cross_archs or []) if a in by_arch and kinds[a] != "dl"]
    for arch_a, arch_b in itertools.combinations(cross, 2):
        for seed in sorted(set(by_arch[arch_a]) & set(by_arch[arch_b])):
            m = match_dictionaries(decoders[(arch_a, seed)], decoders[(arch_b, seed)], device=device)
            pairs.append({"kind": "arch", "arch_a": arch_a, "arch_b": arch_b, "seed_a": seed,
                          "seed_b": seed, **m.summary()})

    pair_cols = ["kind", "arch_a", "arch_b", "seed_a", "seed_b"]
    return GroupTables(
        runs=pd.DataFrame(runs),
        pairs=pd.DataFrame(pairs, columns=None if pairs else pair_cols),
        latents=(pd.concat(lat, ignore_index=True) if lat
                 else pd.DataFrame(columns=["arch", "seed_a", "seed_b", "abs_cos", "live_a",
                                            "live_b"])),
    )


def _chance_rows(acts: ActivationSet, max_rows: int, seed: int) -> torch.Tensor:
    """[R, d] float64: ``max_rows`` training rows drawn from the whole split (as ``isae
    chance`` draws them) in the models' space, the pool the live chance level draws its
    random rows from."""
    x = sample_rows(acts, max_rows, seed)["x"]
    return torch.as_tensor(acts.normalizer().forward(x), dtype=torch.float64)


def _live_chance(row: dict, d: int, gen: torch.Generator, pool: torch.Tensor | None,
                 device: str) -> float:
    """The live chance level of a seed pair's row (NaN without a pool, or a pool smaller
    than a side's live latents)."""
    n_a, n_b = row["live_n_a"], row["live_n_b"]
    if pool is None:
        return np.nan
    if len(pool) < max(n_a, n_b):
        log.warning("live chance level skipped: %d training rows read, %d live latents",
                    len(pool), max(n_a, n_b))
        return np.nan
    return live_chance(n_a, n_b, d, gen, pool, device=device)
