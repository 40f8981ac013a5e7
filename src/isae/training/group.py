"""Grouped training: the TopK-family runs of one pass stepped as one batched model.

The runs that share a pass (seeds, architectures, learning rates of one dataset, k and
width) see the same batches. Stepped one by one, each small SAE leaves the GPU waiting on
its own kernel launches; here every run of one switch set is one stacked model
(isae.models.stacked.StackedCoder, a *part*), and one step of the group runs all parts:
forward, backward, Adam, the decoder constraint and the dead-latent counters, recorded as
one CUDA graph on the fast path (on CUDA each part a parallel branch of it).

Each run stays itself: its initialisation (its coder's, copied), its learning rate and
Adam state (a per-model rate: isae.models.reference.adam_rows_), its dead-latent counters
and AuxK mask, its log rows, its divergence and its checkpoint. ``bind`` makes each run's
coder a view of its part's weights and its ``since_fired`` a view of the part's counters,
so the trainer logs, saves checkpoints and resume states from them as it does for any run;
a run's stepper becomes a ``MemberStepper``, whose state is the one-by-one SAEStepper's
(torch's Adam layout), so a resume state written here resumes one by one and back.

``GroupedPass`` is the trainer's pass stepper (isae.training.steppers.PassStepper) for a
pass with such a group: the group steps its runs, every other run (dictionary learning, a
ReLU SAE, another width) steps alone beside it (``EachRun``). ``grouped_pass`` chooses.

What it computes is the one-by-one result up to float rounding (tests/test_group.py:
on the CPU the grouped reference maths follow separate training closely over tens of
steps; on the GPU, benchmarks/group_bench.py --only group,check). Everything on the GPU is
reached through the op set (isae.models.stacked.select_stacked_ops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from isae.models.compute import grouped_training
from isae.models.config import TrainConfig
from isae.models.reference import Codes
from isae.models.stacked import (
    StackedCoder,
    StackedOps,
    local,
    select_stacked_ops,
    stack_key,
    stacks,
)
from isae.training.steppers import EachRun, Run


class _Part:
    """The runs of one switch set: one stacked model, its Adam state and its counters."""

    def __init__(self, runs: list, ops: StackedOps) -> None:
        self.runs = runs
        self.coder = StackedCoder([r.model for r in runs], ops)
        self.M = len(runs)
        self.N = self.coder.cfg.d_sae
        self.params = self.coder.member_params()
        self.moments = {name: (torch.zeros_like(P), torch.zeros_like(P))
                        for name, (P, _) in self.params.items()}
        device = self.coder.device
        self.step = torch.zeros(self.M, device=device)
        self.lr_base = torch.tensor([r.stepper.base_lr for r in runs], dtype=torch.float32,
                                    device=device)
        self.lr = self.lr_base.clone()
        self.templates = []
        for m, r in enumerate(runs):
            self._pull_adam(m, r.stepper)
            self.templates.append(r.stepper.opt.state_dict()["param_groups"])
        self.since = torch.stack([r.since_fired for r in runs])  # [M, N]
        self.coder.bind([r.model for r in runs])
        for m, r in enumerate(runs):
            r.since_fired = self.since[m]

    @torch.no_grad()
    def _pull_adam(self, m: int, stepper) -> None:
        """Model m's Adam state from its own stepper (a resumed run restored it there)."""
        for name, p in stepper.model.named_parameters():
            st = stepper.opt.state.get(p)
            if not st:
                continue
            _, cut = self.params[name]
            exp_avg, exp_avg_sq = self.moments[name]
            cut(exp_avg, m).copy_(st["exp_avg"])
            cut(exp_avg_sq, m).copy_(st["exp_avg_sq"])
            self.step[m] = float(st["step"])

    def adam_state(self, m: int) -> dict:
        """Model m's Adam state as torch.optim.Adam's state_dict (SAEStepper's layout)."""
        names = list(self.params)
        state = {}
        if float(self.step[m]) > 0:
            for i, name in enumerate(names):
                _, cut = self.params[name]
                exp_avg, exp_avg_sq = self.moments[name]
                state[i] = {"step": self.step[m].detach().cpu().clone(),
                            "exp_avg": cut(exp_avg, m).detach().clone(),
                            "exp_avg_sq": cut(exp_avg_sq, m).detach().clone()}
        groups = [{**g, "params": list(range(len(names)))} for g in self.templates[m]]
        return {"state": state, "param_groups": groups}

    def train_step(self, x: Tensor, total_var: Tensor, width: int | None, tcfg: TrainConfig,
                   ops: StackedOps) -> dict[str, Tensor]:
        """One optimisation step of every model of the part; the dead-latent counters
        updated. Returns [M] tensors loss, fvu, auxk and n_dead_next (the next step's dead
        counts), and the codes, val and idx [M, B, K] (each model's own latent indices)."""
        coder = self.coder
        dead = self.since >= tcfg.dead_tokens
        for P, _ in self.params.values():
            P.grad = None
        out = coder(x, dead, aux_width=width, total_var=total_var,
                    aux_detach=tcfg.auxk_detaches(coder.cfg), aux_fit=tcfg.auxk_fits(coder.cfg))
        loss = out.fvu + tcfg.auxk_alpha_for(coder.cfg) * out.auxk
        if out.fvu_amortised is not None:  # +sg (SparseCoder.loss)
            loss = loss + out.fvu_amortised
        loss.sum().backward()  # each model's gradient is its own loss's
        coder.project_decoder_grad()
        with torch.no_grad():
            self.step += 1
            ops.adam_([(P, P.grad, *self.moments[name]) for name, (P, _) in self.params.items()],
                      self.step, self.lr)
        coder.normalize_decoder()
        with torch.no_grad():  # no boolean indexing: it would wait for the GPU
            nonzero = out.codes.val != 0
            fires = torch.zeros(self.M * self.N, dtype=torch.long, device=x.device)
            fires.scatter_add_(0, out.codes.idx.reshape(-1), nonzero.reshape(-1).long())
            self.since.copy_(torch.where(fires.view(self.M, self.N) > 0, 0, self.since + x.shape[0]))
            return {"loss": loss.detach(), "fvu": out.fvu.detach(), "auxk": out.auxk.detach(),
                    "n_dead_next": (self.since >= tcfg.dead_tokens).sum(1),
                    "val": out.codes.val.detach(), "idx": local(out.codes.idx, self.N)}

    @torch.no_grad()
    def silence(self, m: int) -> None:
        """Model m diverged: finite weights, no moments, no learning rate, so that it
        computes nothing non-finite while the others train on (it is not saved)."""
        self.lr_base[m] = 0.0
        for name, (P, cut) in self.params.items():
            torch.nan_to_num_(cut(P.data, m), nan=0.0, posinf=0.0, neginf=0.0)
            for t in self.moments[name]:
                cut(t, m).zero_()


class MemberStepper:
    """A grouped run's stepper: its learning rate, initial decoder and state; the group
    steps it."""

    def __init__(self, part: _Part, m: int, solo) -> None:
        self.part, self.m = part, m
        self.base_lr = solo.base_lr
        self.initial = solo.initial
        self.model = part.runs[m].model

    def step(self, *args, **kwargs):
        raise RuntimeError("a grouped run is stepped by its group (RunGroup.step)")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.part.adam_state(self.m)}

    def load_state_dict(self, s: dict) -> None:
        raise RuntimeError("a grouped run's state is restored before it joins its group")


class RunGroup:
    """The runs handed to the group, stepped together (see the module docstring)."""

    def __init__(self, runs: list[Run], tcfg: TrainConfig, device: torch.device,
                 ops: StackedOps | None = None) -> None:
        self.tcfg = tcfg
        self.ops = ops or select_stacked_ops(device)
        by_key: dict[tuple, list] = {}
        for r in runs:
            by_key.setdefault(stack_key(r.cfg), []).append(r)
        self.parts = [_Part(rs, self.ops) for rs in by_key.values()]
        self.runs = [r for p in self.parts for r in p.runs]  # the order of the [M] outputs
        self.N = self.parts[0].N
        self._where = [(p, m) for p in self.parts for m in range(p.M)]
        self._silenced: set[int] = set()
        for p in self.parts:
            for m, r in enumerate(p.runs):
                r.stepper = MemberStepper(p, m, r.stepper)
        self._silence_diverged()  # restored as diverged
        self.n_dead = torch.cat([(p.since >= tcfg.dead_tokens).sum(1) for p in self.parts]).tolist()
        self.branches = self.ops.branches(len(self.parts), device)
        self.graphs = self.ops.step_graphs(self._body, self._before_recording, device)
        self._no_dead = torch.zeros(0, dtype=torch.bool, device=device)

    def __contains__(self, run) -> bool:
        return any(run is r for r in self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def _silence_diverged(self) -> None:
        for j, (run, (part, m)) in enumerate(zip(self.runs, self._where)):
            if run.diverged and j not in self._silenced:
                part.silence(m)
                self._silenced.add(j)

    def _body(self, x: Tensor, _dead: Tensor | None, width: int | None) -> dict[str, Tensor]:
        total_var = self.ops.total_var(x)
        outs = []
        for i, part in enumerate(self.parts):
            with self.branches(i):
                outs.append(part.train_step(x, total_var, width, self.tcfg, self.ops))
        self.branches.join()
        return {key: [o[key] for o in outs] for key in outs[0]}

    def _before_recording(self) -> None:
        for part in self.parts:
            for P, _ in part.params.values():
                P.grad = None
            self.ops.refresh_copies(part.coder.W_dec)

    def step(self, x: Tensor, lr_scale: float) -> dict[int, dict]:
        """One step of every live run of the group on the batch x [B, D] at ``lr_scale``
        times each run's learning rate. Returns each run's metrics as a stepper's (loss,
        fvu, auxk: scalars; codes: its own Codes [B, K]), keyed by its index in ``runs``;
        a run the trainer marked diverged is left out (and frozen: it computes nothing
        non-finite while the others train on)."""
        self._silence_diverged()
        for part in self.parts:
            torch.mul(part.lr_base, lr_scale, out=part.lr)
        live = [n for n, r in zip(self.n_dead, self.runs) if not r.diverged]
        width = self.ops.aux_width(max(live, default=0), self.N)
        if self.graphs is not None and width is not None:
            out = self.graphs(x, self._no_dead, width)
        else:
            out = self._body(x, None, width)
        # the one host sync: the next step's dead counts pick its AuxK width (its graph)
        self.n_dead = torch.cat(out["n_dead_next"]).tolist()
        metrics = {}
        for j, (run, (part, m)) in enumerate(zip(self.runs, self._where)):
            if run.diverged:
                continue
            i = self.parts.index(part)
            metrics[j] = {"loss": out["loss"][i][m], "fvu": out["fvu"][i][m],
                          "auxk": out["auxk"][i][m],
                          "codes": Codes(out["val"][i][m], out["idx"][i][m])}
        return metrics


class GroupedPass:
    """The pass stepper (isae.training.steppers.PassStepper) of a pass whose TopK-family
    runs of one shape train as one group; its other runs step one by one beside it."""

    def __init__(self, runs: list[Run], group: RunGroup, others: EachRun) -> None:
        self.runs, self.group, self.others = runs, group, others

    def step(self, x: Tensor, lr_scale: float, deads: list[Tensor]) -> list[dict | None]:
        grouped = self.group.step(x, lr_scale)
        alone = iter(self.others.step(x, lr_scale, [d for r, d in zip(self.runs, deads)
                                                    if r not in self.group]))
        by_run = {id(r): grouped.get(j) for j, r in enumerate(self.group.runs)}
        return [by_run[id(r)] if r in self.group else next(alone) for r in self.runs]


def grouped_pass(runs: list[Run], tcfg: TrainConfig, device: torch.device,
                 grouped: bool | None = None, seed_streams: bool = False) -> GroupedPass | None:
    """The pass stepper that trains the TopK-family runs of the first such run's width and
    k as one group (every run of a pass, as ``isae train`` makes them), when there are at
    least two of them and grouping is on (``grouped``; None: isae.models.compute.
    grouped_training, the GPU's fast path); None otherwise. ``tcfg``: the pass's settings
    (each run keeps its own learning rate). Call it after the runs' resume states are
    restored."""
    group = group_runs(runs, tcfg, device, grouped)
    if group is None:
        return None
    others = [r for r in runs if r not in group]
    return GroupedPass(runs, group, EachRun(others, torch.device(device), seed_streams))


def group_runs(runs: list, tcfg: TrainConfig, device: torch.device,
               grouped: bool | None = None) -> RunGroup | None:
    """The group of the TopK-family runs of ``runs`` of the first such run's width and k,
    when there are at least two and grouping is on; None otherwise."""
    if grouped is None:
        grouped = grouped_training(device)
    if not grouped:
        return None
    # The stacked model computes Gao et al.'s AuxK normalisation only: runs whose settings
    # ask for sparsify's step alone (TrainConfig.auxk_norm).
    topk = [r for r in runs if stacks(r.cfg) and tcfg.auxk_norm == "residual"]
    if not topk:
        return None
    shape = (topk[0].cfg.d_sae, topk[0].cfg.k)
    members = [r for r in topk if (r.cfg.d_sae, r.cfg.k) == shape]
    if len(members) < 2:
        return None
    return RunGroup(members, tcfg, torch.device(device))
