"""Classical dictionary learning, the reference that is not an SAE.

Codes by orthogonal matching pursuit (OMP, k atoms per row); the dictionary by Mairal et
al.'s (2010) online block-coordinate update on running sufficient statistics
A = sum z z^T and B = sum z x^T, with a forgetting factor. The dictionary starts from random
training rows, as sklearn's MiniBatchDictionaryLearning does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from isae.models.reference import omp


class DLStepper:
    """One minibatch of online dictionary learning per ``step``; the same interface as
    trainer.SAEStepper (step, state_dict, load_state_dict)."""

    def __init__(self, model, forget: float = 0.95, seed: int = 0) -> None:
        self.model = model
        N, D = model.W_dec.shape
        dev = model.W_dec.device
        self.A = torch.zeros(N, N, device=dev)
        self.B = torch.zeros(N, D, device=dev)
        self.forget = forget
        self.initialised = False
        self.initial: torch.Tensor | None = None
        """The first atoms (rows of the first batch), before any update: the initial decoder."""
        self.gen = torch.Generator().manual_seed(seed + 1)

    @torch.no_grad()
    def step(self, x: Tensor, lr_scale: float, dead: Tensor | None) -> dict:
        W = self.model.W_dec
        N = W.shape[0]
        if not self.initialised:
            # Random training rows as the first atoms (cycled if the batch is small).
            pick = torch.randperm(x.shape[0], generator=self.gen)
            pick = pick.repeat(N // len(pick) + 1)[:N]
            W.copy_(x[pick.to(x.device)])
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.initial = W.clone()
            self.initialised = True
        codes = omp(x, W, self.model.cfg.k)
        x_hat = (codes.val.unsqueeze(1) @ W[codes.idx]).squeeze(1)
        fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        # Running statistics with forgetting, accumulated sparsely.
        self.A.mul_(self.forget)
        self.B.mul_(self.forget)
        outer = codes.val.unsqueeze(2) * codes.val.unsqueeze(1)  # [B, k, k]
        rows = codes.idx.unsqueeze(2).expand_as(outer).reshape(-1)
        cols = codes.idx.unsqueeze(1).expand_as(outer).reshape(-1)
        self.A.index_put_((rows, cols), outer.reshape(-1), accumulate=True)
        self.B.index_add_(0, codes.idx.reshape(-1), (codes.val.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[1]))
        # One Gauss-Seidel sweep over the atoms (block coordinate descent).
        diag = self.A.diagonal()
        used = (diag > 1e-8).nonzero().squeeze(1).tolist()
        for j in used:
            u = (self.B[j] - self.A[j] @ W) / diag[j] + W[j]
            W[j] = u / u.norm().clamp_min(1e-12)
        # Atoms that no row has used for a while restart from a random row of this batch.
        unused = (diag <= 1e-8).nonzero().squeeze(1)
        if len(unused):
            pick = torch.randint(0, x.shape[0], (len(unused),), generator=self.gen).to(x.device)
            new = x[pick]
            W[unused] = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return {"loss": float(fvu), "fvu": float(fvu), "codes": codes, "auxk": 0.0}

    def state_dict(self) -> dict:
        return {
            "W_dec": self.model.W_dec.detach().clone(),
            "A": self.A.clone(),
            "B": self.B.clone(),
            "initialised": self.initialised,
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, s: dict) -> None:
        # copy_ would broadcast a tensor of the wrong shape: check exactly.
        for name, mine in (("W_dec", self.model.W_dec), ("A", self.A), ("B", self.B)):
            t = s[name]
            if not isinstance(t, Tensor) or t.shape != mine.shape or not t.is_floating_point():
                raise ValueError(f"dictionary-learning state {name} does not fit this model")
        if not isinstance(s["initialised"], bool):
            raise ValueError("dictionary-learning state: initialised must be true or false")
        with torch.no_grad():
            self.model.W_dec.copy_(s["W_dec"])
        self.A.copy_(s["A"])
        self.B.copy_(s["B"])
        self.initialised = s["initialised"]
        self.gen.set_state(s["gen"])
