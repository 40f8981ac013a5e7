"""Dead atoms of a saved run: near-duplicates, alignment with the data's / residual's top PCs."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dead_latents.py beside it
import dead_latents as H0
import torch

from isae.models.config import SAEConfig
from isae.models.reference import topk_select
from isae.models.sparse_coder import SparseCoder

torch.set_num_threads(1)


def pcs(M):
    M = M.double()
    C = M.T @ M / len(M)
    ev, V = torch.linalg.eigh(C)
    return ev.flip(0), V.flip(1).float()


@torch.no_grad()
def analyse(save, H):
    s = torch.load(save)
    cfg = SAEConfig.from_arch(s["arch"], d_in=s["d"], d_sae=s["width"], k=s["k"], seed=0)
    m = SparseCoder(cfg)
    m.load_state_dict(s["state"])
    N = cfg.d_sae
    cnt = torch.zeros(N)
    cnt0 = torch.zeros(N)
    R = []
    for i in range(0, len(H), 4096):
        x = H[i : i + 4096].float()
        c = m.encode(x)
        cnt.scatter_add_(0, c.idx.reshape(-1), (c.val != 0).reshape(-1).float())
        c0 = topk_select(m.pre_acts(x), cfg.k, cfg.signed)
        cnt0.scatter_add_(0, c0.idx.reshape(-1), (c0.val != 0).reshape(-1).float())
        R.append(x - m.decode(c))
    R = torch.cat(R)
    dead = cnt == 0
    live = ~dead
    W = m.W_dec.detach().float()
    W = W / W.norm(dim=1, keepdim=True)
    G = (W @ W.T).abs()
    G.fill_diagonal_(0)
    nn, nn_idx = G.max(1)
    dup = nn > 0.9
    out = {
        "run": save,
        "dead_frac": round(float(dead.float().mean()), 4),
        "dead_amortised_frac": round(float((cnt0 == 0).float().mean()), 4),
        "dead_but_fire_amortised": int((dead & (cnt0 > 0)).sum()),
        "n_dead": int(dead.sum()),
        "neardup_all_pct": round(100 * float(dup.float().mean()), 2),
        "neardup_dead_pct": round(100 * float(dup[dead].float().mean()), 2) if dead.any() else None,
        "neardup_live_pct": round(100 * float(dup[live].float().mean()), 2),
        "dead_nn_is_dead_pct": round(100 * float(dead[nn_idx[dead & dup]].float().mean()), 2)
        if (dead & dup).any()
        else None,
    }
    if dead.any():
        # greedy clusters among dead atoms at |cos| > 0.9
        Wd = W[dead]
        Gd = (Wd @ Wd.T).abs()
        left = torch.ones(len(Wd), dtype=torch.bool)
        sizes = []
        while left.any():
            i = int(left.nonzero()[0])
            grp = left & (Gd[i] > 0.9)
            grp[i] = True
            sizes.append(int(grp.sum()))
            left &= ~grp
        sizes.sort(reverse=True)
        out["dead_clusters"] = len(sizes)
        out["dead_cluster_sizes_top"] = sizes[:8]
    for name, M in (("data", H.float()), ("resid", R)):
        ev, V = pcs(M)
        out[f"{name}_ev_top3_share"] = [round(float(e / ev.sum()), 3) for e in ev[:3]]
        P = W @ V  # [N, d] coefficients on the PCs
        for grp, mask in (("dead", dead), ("live", live)):
            if not mask.any():
                continue
            out[f"{name}_pc1_abscos_{grp}"] = round(float(P[mask, 0].abs().mean()), 3)
            out[f"{name}_top5_energy_{grp}"] = round(float(P[mask, :5].pow(2).sum(1).mean()), 3)
            out[f"{name}_top5_energy_{grp}"] = round(float(P[mask, :5].pow(2).sum(1).mean()), 3)
            # energy-weighted: E[(w.x)^2] / E[|x|^2] (how much variance the atom direction carries)
            out[f"{name}_var_along_{grp}"] = round(
                float((P[mask].pow(2) * ev.float()).sum(1).mean() / ev.sum() * len(ev)), 3
            )
    out["rand_top5_energy"] = round(5 / W.shape[1], 3)
    # the k-th largest |pre| per row vs dead atoms' |pre|
    x = H[:20000].float()
    pre = m.pre_acts(x).abs()
    kth = pre.topk(cfg.k, dim=1).values[:, -1]
    if dead.any():
        out["dead_max_over_kth_median"] = round(
            float((pre[:, dead] / kth[:, None]).max(0).values.median()), 3
        )
        out["dead_mean_abspre"] = round(float(pre[:, dead].mean()), 3)
    out["live_mean_abspre"] = round(float(pre[:, live].mean()), 3)
    out["kth_median"] = round(float(kth.median()), 3)
    return out


if __name__ == "__main__":
    rows = SimpleNamespace(activations=sys.argv[1], pca=int(sys.argv[2]), train_rows=1_000_000)
    X, H, _ = H0.load_rows(rows)
    for sv in sys.argv[3:]:
        print(json.dumps(analyse(sv, H)), flush=True)
