"""The optimal assignment of two dictionaries by |cos|, solved on a sparse candidate graph and
proved optimal on the full matrix by LP duality.

The problem: W = |A Bᵀ| (float32, unit rows, [n, N]); find the matching of min(n, N) pairs
with the largest total W. Hungarian on the dense matrix costs O(n³) time and a dense float64
copy; trained dictionaries, full of near-ties, are its worst case. Here:

1. **Candidates.** One pass over W in row blocks on the device keeps each row's ``m`` largest
   entries, each column's ``m`` largest and the diagonal (so that a full matching exists),
   and remembers θ_i and φ_j, the m-th largest entry of row i and of column j: every entry
   left out of the graph is at most min(θ_i, φ_j).
2. **Solve** the sparse graph exactly (LAPJVsp: ``scipy.sparse.csgraph.
   min_weight_full_bipartite_matching``); after the first round on the reduced costs of the
   last duals, the same problem, which JV's greedy start mostly settles at once.
3. **Duals.** Column prices v ≥ 0 as the least fixpoint of v_j = max(0, max_i w_ij − u_i) over
   the graph's edges, u_i = w_iσ(i) − v_σ(i) (Bellman–Ford on the alternating graph; it
   converges because σ is optimal on the graph, and a cycle among the price setters shows
   when it is not). On a square problem each round starts from the last prices.
4. **Certificate.** With r_i = max over the FULL row of (w_ij − v_j), the dual solution
   (u' = r, v) is feasible for the LP of the full matrix (rows ≥ 0 clamped where n > N), so
   D = Σ u' + Σ v bounds every assignment from above, and gap = D − Σ w_iσ(i) ≥ 0 bounds the
   distance of σ from the optimum. r_i comes from the graph alone where a bound shows that
   no left-out entry can beat it (max_j (min(θ_i, φ_j) − v_j), or what an earlier read of
   the row left out); the other rows are read on the device. Entries that violate the
   duals (and those within ``near`` of it) join the graph and 2–4 repeat, trying the last σ
   with new prices before solving again.
5. **Fallback.** If that does not close within ``max_rounds`` rounds or the graph grows past
   ``max_edges``, the dense Hungarian solver (scipy) solves the whole matrix, and the
   certificate says so.

Exactness: the certificate is computed in float64 on the float32 entries; a row's term is
exactly 0 when no entry beats its matched one, so a proved gap is 0.0 or a few ulps of
float64 per row. ``EXACT_TOL`` (1e-9, on the sum of |cos|, far below one float32 ulp of a
single entry) is where we call the assignment exact: no other assignment has a total larger
by more than that.

Memory: the graph (about 2m(n + N) edges, 24 bytes each on the host), one block of W on the
device, and W itself as float32 on the device when it fits ``cache_bytes`` (2.4 GB at
24 576²) so that rounds after the first need no matrix product; without the cache, rows are
recomputed in the same blocks, which reproduces them bitwise (checked).

Pure functions on tensors and arrays; no I/O.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

log = logging.getLogger(__name__)

#: A certificate's gap at or under this (on the sum of matched |cos|) means exact.
EXACT_TOL = 1e-9
#: A reduced cost above this counts as a violation of the duals (its edge joins the graph).
_VIOLATION_TOL = 1e-12
#: Price increases at or under this stop the dual iteration (rounding around a zero cycle).
_PRICE_TOL = 1e-13


@dataclass(frozen=True)
class Certificate:
    """How an assignment was found and what was proved about it."""

    method: str
    """``sparse``: candidate graph plus duality check; ``dense``: the dense Hungarian
    solver (scipy), used when the sparse path could not prove optimality in its bounds."""
    gap: float
    """Proved bound: no assignment has a total |cos| larger by more than this. 0.0 for the
    dense solver, whose optimality is that of its algorithm, not of a dual check."""
    rounds: int
    """Checks of the sparse path against the full matrix (0: none ran)."""
    solves: int
    """Exact solves of the candidate graph among them (a round after new edges first tries
    the last assignment with new prices)."""
    edges: int
    """Edges of the candidate graph in the last round."""
    reason: str = ""
    """Why the dense solver ran, empty otherwise."""

    @property
    def exact(self) -> bool:
        return self.gap <= EXACT_TOL

    def summary(self) -> dict:
        return {"assignment_method": self.method, "assignment_gap": self.gap,
                "assignment_exact": self.exact, "assignment_rounds": self.rounds,
                "assignment_solves": self.solves, "assignment_edges": self.edges}


@dataclass(frozen=True)
class Assignment:
    """An optimal assignment of rows of W to columns, with W's row and column maxima."""

    rows: np.ndarray
    """[M] int64 row indices (M = min(n, N)), ascending."""
    cols: np.ndarray
    """[M] int64 column indices: row rows[k] goes with column cols[k]."""
    best_row: np.ndarray
    """[n] float64: max of each row of W."""
    best_col: np.ndarray
    """[N] float64: max of each column of W."""
    certificate: Certificate


# ----------------------------------------------------------------------------- the matrix


class AbsCos:
    """W = |A Bᵀ| in fixed row blocks on A's device: ``block(k)`` always computes block k with
    the same operation on the same shapes, so a recomputed entry equals the first one bitwise
    (the check in ``certify`` verifies it); kept whole when it fits ``cache_bytes``.

    (A: [n, D], B: [N, D] float32 unit rows on one device.)
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, block: int, cache_bytes: int):
        self.A, self.B, self.bs = A, B, block
        self.n, self.N = A.shape[0], B.shape[0]
        self.nblocks = -(-self.n // block)
        self.cache = (torch.empty(self.n, self.N, device=A.device)
                      if self.n * self.N * 4 <= cache_bytes else None)
        self._filled = 0
        self._buf: torch.Tensor | None = None

    def block(self, k: int) -> torch.Tensor:
        """[rows of block k, N] float32, valid until the next call (blocks share a buffer)."""
        i = k * self.bs
        if self.cache is not None and k < self._filled:
            return self.cache[i : i + self.bs]
        b = min(self.bs, self.n - i)
        if self.cache is not None and k == self._filled:
            out = self.cache[i : i + b]
            self._filled += 1
        else:
            # One buffer for every block: fresh large tensors cost page faults each time.
            if self._buf is None or self._buf.shape[0] != b:
                self._buf = torch.empty(b, self.N, device=self.A.device)
            out = self._buf
        return torch.matmul(self.A[i : i + b], self.B.T, out=out).abs_()

    def rows(self, idx: torch.Tensor, chunk: int):
        """Yield (idx_part [r], W[idx_part] [r, N] float32) for sorted row indices ``idx``."""
        if len(idx) == 0:
            return
        if self.cache is not None and self._filled == self.nblocks:
            for s in range(0, len(idx), chunk):
                part = idx[s : s + chunk]
                yield part, self.cache[part]
            return
        which = idx // self.bs
        for k in torch.unique(which).tolist():
            part = idx[which == k]
            c = self.block(k)
            for s in range(0, len(part), chunk):
                p = part[s : s + chunk]
                yield p, c[p - k * self.bs]


# ----------------------------------------------------------------------------- candidates


@dataclass
class Graph:
    """The sparse candidate graph, edges sorted by (row, col), with the bounds on the rest."""

    n: int
    N: int
    rows: np.ndarray
    """[E] int64."""
    cols: np.ndarray
    """[E] int64."""
    w: np.ndarray
    """[E] float64 values of W (float32 entries, exactly)."""
    theta: torch.Tensor
    """[n] float64: every entry of row i outside the graph is <= theta[i] (-inf: none)."""
    phi: torch.Tensor
    """[N] float64: every entry of column j outside the graph is <= phi[j] (-inf: none)."""
    outside: torch.Tensor | None = None
    """[n] float64: max over the entries of row i outside the graph of w_ij - v_j, at most,
    for the prices of the last check (+inf: not known), from the rows that check read."""

    def reprice(self, v_old: np.ndarray, v_new: np.ndarray) -> None:
        """Keep ``outside`` an upper bound when the prices move from v_old to v_new."""
        if self.outside is not None:
            self.outside += max(0.0, float(np.max(v_old - v_new, initial=0.0)))

    def add(self, rows: np.ndarray, cols: np.ndarray, w: np.ndarray) -> int:
        """Add edges (duplicates of existing ones are dropped); -> how many were new."""
        before = len(self.rows)
        r = np.concatenate([self.rows, rows])
        c = np.concatenate([self.cols, cols])
        x = np.concatenate([self.w, w])
        _, first = np.unique(r * self.N + c, return_index=True)
        self.rows, self.cols, self.w = r[first], c[first], x[first]
        return len(self.rows) - before


def _topk_dim0(c: torch.Tensor, k: int, buf: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each column of c [b, N] -> ([k, N] values, [k, N] row indices).
    ``buf``: a one-slot list holding the CPU transpose buffer between calls."""
    if c.device.type != "cpu":
        return c.topk(k, dim=0)
    # torch's CPU topk along a strided dim is several times slower than transposing first,
    # and a fresh transposed tensor costs as much again in page faults.
    if buf[0] is None or buf[0].shape != (c.shape[1], c.shape[0]):
        buf[0] = torch.empty(c.shape[1], c.shape[0])
    v, i = buf[0].copy_(c.T).topk(k, dim=1)
    return v.T, i.T


@torch.no_grad()
def candidate_graph(W: AbsCos, m: int) -> tuple[Graph, torch.Tensor, torch.Tensor]:
    """One pass over W: each row's and each column's m largest entries and the diagonal.

    -> (graph, row maxima [n] float64, column maxima [N] float64), the maxima on W's device.
    """
    n, N, dev = W.n, W.N, W.A.device
    mr, mc = min(m, N), min(m, n)
    rv = torch.empty(n, mr, device=dev)
    ri = torch.empty(n, mr, dtype=torch.int64, device=dev)
    cv = ci = None
    dg = torch.empty(min(n, N), device=dev)
    buf = [None]
    for k in range(W.nblocks):
        c = W.block(k)
        i0, b = k * W.bs, c.shape[0]
        rv[i0 : i0 + b], ri[i0 : i0 + b] = c.topk(mr, dim=1)
        v, i = _topk_dim0(c, min(mc, b), buf)
        i = i + i0
        if cv is not None:
            v, pos = torch.cat([cv, v]).topk(min(mc, cv.shape[0] + v.shape[0]), dim=0)
            i = torch.cat([ci, i]).gather(0, pos)
        cv, ci = v, i
        d = torch.arange(i0, max(i0, min(i0 + b, N)), device=dev)
        dg[d] = c[d - i0, d]
        del c
    inf = torch.tensor(-float("inf"), dtype=torch.float64, device=dev)
    theta = rv[:, -1].double() if mr < N else inf.expand(n).clone()
    phi = cv[-1].double() if mc < n else inf.expand(N).clone()
    rows = torch.cat([torch.arange(n, device=dev).repeat_interleave(mr), ci.T.reshape(-1),
                      torch.arange(len(dg), device=dev)])
    cols = torch.cat([ri.reshape(-1), torch.arange(N, device=dev).repeat_interleave(mc),
                      torch.arange(len(dg), device=dev)])
    w = torch.cat([rv.reshape(-1), cv.T.reshape(-1), dg]).double()
    g = Graph(n, N, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), theta, phi)
    g.add(rows.cpu().numpy(), cols.cpu().numpy(), w.cpu().numpy())
    return g, rv[:, 0].double(), cv[0].double()


# ----------------------------------------------------------------------------- solve, duals


def solve_graph(g: Graph, u: np.ndarray | None = None, v: np.ndarray | None = None
                ) -> np.ndarray:
    """The maximum-weight full matching of the graph (LAPJVsp) -> sigma [n] int64: each row's
    column, -1 for the rows left free (n > N).

    ``u`` [n], ``v`` [N]: duals to solve on the reduced costs u_i + v_j - w_ij instead, the
    same problem (every full matching has the same sum of the duals it may use: u where
    every row is matched, v where every column is) that JV's greedy start mostly solves
    at once where the duals are nearly optimal.
    """
    indptr = np.searchsorted(g.rows, np.arange(g.n + 1))
    cost = -g.w
    if u is not None and g.n <= g.N:
        cost = cost + u[g.rows]
    if v is not None and g.n >= g.N:
        cost = cost + v[g.cols]
    # Shifted by a constant into [1, 4]: LAPJVsp reads a stored zero as a missing edge.
    G = sp.csr_array((cost + (2.0 - cost.min()) , g.cols, indptr), shape=(g.n, g.N))
    r, c = min_weight_full_bipartite_matching(G)
    sigma = np.full(g.n, -1, np.int64)
    sigma[r] = c
    return sigma


class _NotConverged(Exception):
    pass


def column_prices(g: Graph, sigma: np.ndarray, v0: np.ndarray | None = None,
                  max_iter: int = 100000, device: str | torch.device = "cpu"
                  ) -> tuple[np.ndarray, int]:
    """The least prices v >= v0 (default 0) [N] that make the graph's duals feasible for
    ``sigma``: v_j = max(v_j, max over edges (i, j) of w_ij - u_i), u_i = w_iσ(i) - v_σ(i)
    (0 for a free row), by Bellman–Ford, each round over the edges of the rows whose u
    changed. They exist when sigma is optimal on the graph; when it is not, an improving
    alternating cycle raises them without end, and shows as a cycle among the columns that
    last raised each price (checked every few rounds): _NotConverged.
    -> (v float64 on the host, iterations). On a GPU ``device`` the same rounds run there
    (the same prices, bit for bit: maxima do not depend on the order).
    """
    if torch.device(device).type != "cpu":
        return _column_prices_torch(g, sigma, v0, max_iter, torch.device(device))
    indptr = np.searchsorted(g.rows, np.arange(g.n + 1))
    matched = sigma >= 0
    sig0 = np.where(matched, sigma, 0)
    pos = np.searchsorted(g.rows * g.N + g.cols, np.arange(g.n) * g.N + sig0)
    w_sig = np.where(matched, g.w[np.minimum(pos, len(g.w) - 1)], 0.0)
    owner = np.full(g.N, -1, np.int64)
    owner[sigma[matched]] = np.flatnonzero(matched)
    # parent[j]: the column whose price last set v_j (through its owner), N for none.
    parent = np.full(g.N + 1, g.N, np.int64)
    via = np.where(matched, sig0, g.N)
    v = np.zeros(g.N) if v0 is None else v0.astype(np.float64, copy=True)
    u = np.where(matched, w_sig - v[sig0], 0.0)
    front = np.arange(g.n)
    for it in range(max_iter):
        if len(front) == 0:
            return v, it
        start, lens = indptr[front], indptr[front + 1] - indptr[front]
        e = np.arange(lens.sum()) + np.repeat(start - (np.cumsum(lens) - lens), lens)
        c = g.cols[e]
        t = g.w[e] - np.repeat(u[front], lens)
        better = t > v[c] + _PRICE_TOL
        c, t, r = c[better], t[better], np.repeat(front, lens)[better]
        np.maximum.at(v, c, t)
        hit = t == v[c]
        parent[c[hit]] = via[r[hit]]
        if it % 8 == 7 and _has_cycle(parent):
            raise _NotConverged("the assignment is not optimal on the graph")
        front = owner[np.unique(c)]
        front = front[front >= 0]
        u[front] = w_sig[front] - v[sig0[front]]
    raise _NotConverged(f"column prices did not converge in {max_iter} iterations")


@torch.no_grad()
def _column_prices_torch(g: Graph, sigma: np.ndarray, v0: np.ndarray | None, max_iter: int,
                         device: torch.device) -> tuple[np.ndarray, int]:
    """``column_prices`` in torch (for a GPU, where numpy's loop would wait on the host)."""
    rows = torch.as_tensor(g.rows, device=device)
    cols = torch.as_tensor(g.cols, device=device)
    w = torch.as_tensor(g.w, device=device)
    indptr = torch.searchsorted(rows, torch.arange(g.n + 1, device=device))
    sig = torch.as_tensor(sigma, device=device)
    matched = sig >= 0
    sig0 = sig.clamp_min(0)
    pos = torch.searchsorted(rows * g.N + cols, torch.arange(g.n, device=device) * g.N + sig0)
    w_sig = torch.where(matched, w[pos.clamp_max(len(w) - 1)], 0.0)
    owner = torch.full((g.N,), -1, dtype=torch.int64, device=device)
    owner[sig[matched]] = torch.nonzero(matched).squeeze(1)
    parent = torch.full((g.N + 1,), g.N, dtype=torch.int64, device=device)
    via = torch.where(matched, sig0, g.N)
    v = (torch.zeros(g.N, dtype=torch.float64, device=device) if v0 is None
         else torch.as_tensor(v0, dtype=torch.float64, device=device).clone())
    u = torch.where(matched, w_sig - v[sig0], 0.0)
    front = torch.arange(g.n, device=device)
    for it in range(max_iter):
        if len(front) == 0:
            return v.cpu().numpy(), it
        start, lens = indptr[front], indptr[front + 1] - indptr[front]
        total = int(lens.sum())
        e = torch.arange(total, device=device) + torch.repeat_interleave(
            start - (torch.cumsum(lens, 0) - lens), lens, output_size=total)
        c = cols[e]
        t = w[e] - torch.repeat_interleave(u[front], lens, output_size=total)
        better = t > v[c] + _PRICE_TOL
        r = torch.repeat_interleave(front, lens, output_size=total)[better]
        c, t = c[better], t[better]
        v.scatter_reduce_(0, c, t, reduce="amax")
        hit = t == v[c]
        parent[c[hit]] = via[r[hit]]
        if it % 8 == 7:
            p = parent
            for _ in range(int(g.N + 1).bit_length()):
                p = p[p]
            if bool((p != g.N).any()):
                raise _NotConverged("the assignment is not optimal on the graph")
        front = owner[torch.unique(c)]
        front = front[front >= 0]
        u[front] = w_sig[front] - v[sig0[front]]
    raise _NotConverged(f"column prices did not converge in {max_iter} iterations")


def _has_cycle(parent: np.ndarray) -> bool:
    """Whether following ``parent`` [N + 1] (N: the root, parent[N] = N) ever cycles."""
    p = parent
    for _ in range(int(len(p)).bit_length()):
        p = p[p]
    return bool((p != len(p) - 1).any())


def _row_bound(theta: torch.Tensor, phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """b_i = max_j min(theta_i, phi_j) - v_j: the most any entry left out of the graph can
    reach in row i's reduced values. [n] float64."""
    order = torch.argsort(phi)
    ps, vs = phi[order], v[order]
    pre = torch.cummax(ps - vs, 0).values  # best over columns with phi_j <= theta
    suf = torch.flip(torch.cummin(torch.flip(vs, [0]), 0).values, [0])  # least v, phi_j >= theta
    k = torch.searchsorted(ps, theta)  # columns [0, k) have phi_j < theta_i
    N = len(ps)
    lo = torch.where(k > 0, pre[(k - 1).clamp_min(0)], -torch.inf)
    hi = torch.where(k < N, theta - suf[k.clamp_max(N - 1)], -torch.inf)
    out = torch.maximum(lo, hi)
    return torch.where(torch.isneginf(theta), -torch.inf, out)


# ----------------------------------------------------------------------------- certificate


@dataclass
class Check:
    gap: float
    """Proved bound on the distance of sigma's total from the optimum."""
    r: torch.Tensor
    """[n] float64: max over each full row of w_ij - v_j."""
    scanned: int
    """Rows that had to be read in full."""
    add: tuple[np.ndarray, np.ndarray, np.ndarray]
    """Edges (rows, cols, w) that violate the duals or nearly do, to join the graph."""
    outside: tuple[torch.Tensor, torch.Tensor] | None = None
    """(rows read, bound): with ``add`` in the graph, each read row's entries outside it
    have w_ij - v_j at most bound (see ``Graph.outside``)."""


@torch.no_grad()
def certify(W: AbsCos, sigma: np.ndarray, v: torch.Tensor, g: Graph | None = None,
            near: float = 0.05, per_row: int = 64, chunk_bytes: int | None = None) -> Check:
    """The duality gap of the assignment ``sigma`` (row -> column, -1 free) under column
    prices ``v`` >= 0 [N], any prices: D = Σ_i u'_i + Σ_j v_j with u'_i = max_j (w_ij - v_j)
    over the full row (clamped at 0 where n > N) is an upper bound on every assignment's
    total, so gap = D - Σ_i w_iσ(i) >= (optimum - sigma's total) >= 0.

    With ``g`` (a graph containing every edge of sigma) a row is read in full only where
    the graph's bounds leave its max open; without, every row is read. Rows with a
    violation (or a reduced value within ``near`` of one) offer up to ``per_row`` of their
    largest reduced entries as new edges.
    """
    n, N, dev = W.n, W.N, v.device
    sig = torch.as_tensor(sigma, device=dev)
    matched = sig >= 0
    sig0 = sig.clamp_min(0)
    r = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev)
    u = torch.zeros(n, dtype=torch.float64, device=dev)
    if g is not None:
        rows = torch.as_tensor(g.rows, device=dev)
        cols = torch.as_tensor(g.cols, device=dev)
        w = torch.as_tensor(g.w, device=dev)
        r.scatter_reduce_(0, rows, w - v[cols], reduce="amax")
        pos = torch.searchsorted(rows * N + cols, torch.arange(n, device=dev) * N + sig0)
        w_sig = torch.where(matched, w[pos.clamp_max(len(w) - 1)], 0.0)
        u = torch.where(matched, w_sig - v[sig0], 0.0)
        bound = _row_bound(g.theta, g.phi, v)
        if g.outside is not None:
            bound = torch.minimum(bound, g.outside.to(dev))
        scan = torch.nonzero(bound > r).squeeze(1)
    else:
        w_sig = torch.zeros(n, dtype=torch.float64, device=dev)
        scan = torch.arange(n, device=dev)
    add_r, add_c, add_w, out_r, out_b = [], [], [], [], []
    if chunk_bytes is None:  # on the CPU, chunks that stay in cache between the passes
        chunk_bytes = 1 << 29 if dev.type == "cuda" else 1 << 23
    chunk = max(1, chunk_bytes // (4 * max(N, 1)))
    # The scan runs in float32; an entry within ``slack`` of a row's float32 max may be its
    # float64 max (each of the two roundings errs by at most 2^-24 of |x| <= 1 + max v), and
    # only those entries are evaluated again in float64.
    v32 = v.float()
    slack = 4 * 2.0**-24 * (2.0 + float(v.abs().max()))
    for idx, c in W.rows(scan, chunk):
        x = c - v32
        top = x.max(dim=1).values
        ri, cj = torch.nonzero(x >= (top - slack)[:, None], as_tuple=True)
        exact = c[ri, cj].double() - v[cj]
        r[idx] = torch.full((len(idx),), -torch.inf, dtype=torch.float64,
                            device=dev).scatter_reduce_(0, ri, exact, reduce="amax")
        got = torch.where(matched[idx], c.gather(1, sig0[idx, None]).squeeze(1).double(), 0.0)
        if g is None:
            w_sig[idx] = got
            u[idx] = torch.where(matched[idx], got - v[sig0[idx]], 0.0)
        elif not torch.equal(got, w_sig[idx]):
            raise _NotConverged("a recomputed block of |cos| differs from the first pass")
        # Near-violators (reduced value above -near): a heuristic, float32 is enough. Rows
        # with more than per_row of them offer their per_row largest.
        # Entries left out: at most thr where every entry above it was added, else at most
        # the (per_row + 1)-th largest; plus the float32 slack.
        thr = u[idx].float() - near
        ri, cj = torch.nonzero(x > thr[:, None], as_tuple=True)
        left = thr.double()
        many = torch.bincount(ri, minlength=len(idx)) > per_row
        if many.any():
            keep = ~many[ri]
            hr = torch.nonzero(many).squeeze(1)
            val, col = x[hr].topk(per_row + 1, dim=1)
            left[hr] = val[:, -1].double()
            col = col[:, :-1]
            ri = torch.cat([ri[keep], hr.repeat_interleave(per_row)])
            cj = torch.cat([cj[keep], col.reshape(-1)])
        out_r.append(idx)
        out_b.append(left + slack)
        if len(ri):
            add_r.append(idx[ri])
            add_c.append(cj)
            add_w.append(c[ri, cj].double())

    up = r.clamp_min(0) if n > N else r  # where n > N every row's dual must be >= 0
    term = torch.where(matched, up - u, up)
    gap = float(term.sum())
    if n < N:
        free = torch.ones(N, dtype=torch.bool, device=dev)
        free[sig[matched]] = False
        gap += float(v[free].sum())
    violated = bool(((r - u) > _VIOLATION_TOL).any())
    if violated and add_r:
        add = tuple(torch.cat(t).cpu().numpy() for t in (add_r, add_c, add_w))
    else:
        add = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0))
    outside = (torch.cat(out_r), torch.cat(out_b)) if out_r else None
    return Check(gap=max(gap, 0.0), r=r, scanned=len(scan), add=add, outside=outside)


# ----------------------------------------------------------------------------- the solver


def dense_assignment(W: AbsCos) -> np.ndarray:
    """sigma [n] (-1 free) by scipy's dense Hungarian solver on W in float64."""
    from scipy.optimize import linear_sum_assignment  # 1-2 s to import: only when needed

    cost = np.empty((W.n, W.N), np.float64)
    for k in range(W.nblocks):
        c = W.block(k)
        np.negative(c.cpu().numpy(), out=cost[k * W.bs : k * W.bs + c.shape[0]],
                    dtype=np.float64)
    r, c = linear_sum_assignment(cost)
    del cost
    sigma = np.full(W.n, -1, np.int64)
    sigma[r] = c
    return sigma


def default_cache_bytes(device: torch.device) -> int:
    """Keep W whole on the device up to: a quarter of the GPU's free memory, 1 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return 1 << 30


@torch.no_grad()
def assign_abs_cos(A: torch.Tensor, B: torch.Tensor, block: int = 4096, m: int = 16,
                   max_rounds: int = 32, max_edges: int | None = None,
                   cache_bytes: int | None = None, method: str = "sparse") -> Assignment:
    """The maximum-|cos| assignment of the rows of A to the rows of B, with its certificate.

    (A: [n, D], B: [N, D] float32 unit rows on one device) -> Assignment of min(n, N) pairs.
    ``m``: candidates per row and per column; ``max_rounds``, ``max_edges`` (default
    256 (n + N), 24 bytes each on the host): the sparse path's bounds before the dense
    fallback. Dead atoms that collapse onto a few shared directions (isae-iter at 32 x d on
    MiniLM) make blocks of near-ties that take 10-13 rounds and more edges to certify; with
    8 rounds and 64 (n + N) edges such 12 288-latent matchings fell back to the dense solver
    at 80-95 s each on a GPU run's host. ``cache_bytes``: keep W
    on the device up to this size (default ``default_cache_bytes``); ``method``: ``sparse``
    (certified, with the fallback) or ``dense`` (scipy alone).
    """
    if method not in ("sparse", "dense"):
        raise ValueError(f"unknown assignment method {method!r}")
    n, N, dev = A.shape[0], B.shape[0], A.device
    if cache_bytes is None:
        cache_bytes = default_cache_bytes(dev)
    W = AbsCos(A, B, block, cache_bytes)
    if n == 0 or N == 0:
        z = np.empty(0, np.int64)
        return Assignment(z, z, np.zeros(n), np.zeros(N), Certificate("sparse", 0.0, 0, 0, 0))
    t = time.perf_counter()
    g, best_row, best_col = candidate_graph(W, m)
    best = (best_row.cpu().numpy(), best_col.cpu().numpy())
    log.debug("assignment %d x %d: candidates %.2f s, %d edges, |cos| %s", n, N,
              time.perf_counter() - t, len(g.rows),
              "kept on the device" if W.cache is not None else "recomputed by blocks")
    max_edges = 256 * (n + N) if max_edges is None else max_edges
    reason, rounds, sigma, gap, v_old = "", 0, None, float("inf"), None
    if method == "dense":
        reason = "asked for"
    g.outside = torch.full((n,), torch.inf, dtype=torch.float64)
    solve, solves, iters, duals = True, 0, 0, (None, None)
    while not reason:
        if rounds == max_rounds:
            reason = f"no proof after {rounds} rounds (gap {gap:.3g})"
            break
        if len(g.rows) > max_edges:
            reason = f"candidate graph past {max_edges} edges"
            break
        t0 = time.perf_counter()
        if solve:
            sigma = solve_graph(g, *duals)
            solves += 1
        t1 = time.perf_counter()
        try:
            # Square: start from the last prices (they only rise, and the rows read last
            # time keep their bounds); rectangular: from 0 (free columns must stay at 0).
            # After new edges, first try the old sigma: if the prices still converge it is
            # still optimal on the graph, and the solve is saved (a sigma that is not
            # optimal makes them rise without end: past a few times the first count of
            # iterations, solve again).
            v_new, it = column_prices(g, sigma, v_old if n == N else None,
                                      max_iter=100000 if solve else 4 * iters + 64,
                                      device=dev)
        except _NotConverged as e:
            if not solve:
                solve = True
                continue
            reason = str(e)
            break
        iters = max(iters, it)
        rounds += 1
        if v_old is not None:
            g.reprice(v_old, v_new)
        v_old = v_new
        t2 = time.perf_counter()
        try:
            check = certify(W, sigma, torch.as_tensor(v_new, device=dev), g)
        except _NotConverged as e:
            reason = str(e)
            break
        gap = check.gap
        duals = (check.r.cpu().numpy(), v_new)
        log.debug("assignment round %d: %s %.2f s, prices %.2f s (%d iterations), check %.2f s "
                  "(%d rows read); %d edges, gap %.3g, %d to add", rounds,
                  "solve" if solve else "no solve", t1 - t0, t2 - t1, it,
                  time.perf_counter() - t2, check.scanned, len(g.rows), gap, len(check.add[0]))
        if gap <= EXACT_TOL:
            break
        if g.add(*check.add) == 0:
            if solve:
                reason = f"gap {gap:.3g} and no violated edge left to add"
            # Else the old sigma is not optimal on the graph through a free row or column
            # (no cycle shows it): solve.
            solve = True
            continue
        if check.outside is not None:
            g.outside[check.outside[0].cpu()] = check.outside[1].cpu()
        solve = False
    if reason:
        if method != "dense":
            log.warning("matching %d x %d: the sparse solver could not prove optimality (%s); "
                        "solving the dense problem instead (%.1f GB float64 on the host)",
                        n, N, reason, n * N * 8 / 1e9)
        sigma = dense_assignment(W)
        cert = Certificate("dense", 0.0, rounds, solves, len(g.rows), reason)
    else:
        cert = Certificate("sparse", gap, rounds, solves, len(g.rows))
    rows = np.flatnonzero(sigma >= 0)
    return Assignment(rows, sigma[rows], best[0], best[1], cert)
