"""What kills latents at large widths: a CPU harness that trains one TopK-family SAE under a
chosen dead-latent recipe and traces the fraction of latents that never fire on held-out rows.

Research, not the trainer: the loop below is the trainer's step (isae.training.trainer:
Adam, the unit-norm decoder with gradient projection, linear warmup and decay, AuxK on the
latents that have not fired for ``dead_tokens`` rows) written out so that each ingredient
can be varied alone:

  --lr-factor F          the rate, as a multiple of isae's default 8e-4 / sqrt(width / 2^14)
                         (sparsify's is 0.25)
  --auxk-alpha A         AuxK's weight (ours 1/32)
  --auxk-norm N          residual: AuxK's FVU of the residual (Gao et al., ours);
                         input: sparsify's, the squared error over the batch's total
                         variance, scaled by min(n_dead / k_aux, 1)
  --k-aux K              AuxK's k (ours and sparsify's: d / 2)
  --auxk-detach          AuxK's codes without gradient, so that AuxK moves the dead
                         latents' decoder rows only (what sparsify's fused encoder does)
  --auxk-ls-scale        AuxK's decode times the detached per-row least-squares scale
                         <e, e_hat>/<e_hat, e_hat> (AuxK through the codes without pulling
                         their scale down; benchmarks/dead_latents_tied.md)
  --dead-enc-renorm      rescale the window-dead latents' encoder columns to the live
                         median norm after each step (untied encoders)
  --auxk-enc-tangent     drop the radial part of the dead latents' encoder gradient
  --trace FILE           per-evaluation per-latent encoder norms, enc/dec cosines, silence
                         and fire counts, and AuxK's radial gradient statistic (torch.save)
  --dead-tokens T        the dead window in rows (ours 200 000; sparsify 10 M)
  --init I               random: unit Gaussian rows (ours); data: rows drawn from the
                         training split; enc-scale S: an untied encoder S x W_dec^T
  --schedule S           isae: constant then linear decay over the last 20 %;
                         sparsify: linear decay from the warmup to 0
  --warmup-frac W        the linear warmup's share of the steps (ours 0.02)
  --optimizer O          adam (ours); lazy-adam: a latent's parameters and Adam moments
                         stay as they are on a step where it takes no part (no gradient)
  --beta2 B              Adam's second-moment decay (ours 0.999)
  --multi-topk W         add W x the FVU of the top-4k decode (Gao et al.'s Multi-TopK;
                         sparsify's weight is 1/8)

It prints one JSON line per evaluation (dead % on the first --eval-rows held-out rows, the
training FVU) and a final line with dead % and FVU on every held-out row. The findings are
in benchmarks/RESULTS.md ("Dead latents at 32 x d").

    python benchmarks/dead_latents.py --activations SET --arch topk --width 6144 --k 16 \
        --tokens 2000000 --lr-factor 4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from isae.data.activations import ActivationSet
from isae.models.config import SAEConfig, TrainConfig
from isae.models.reference import auxk_select, fvu, sparse_decode, topk_select
from isae.models.sparse_coder import SparseCoder
from isae.training.trainer import lr_multiplier


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", required=True)
    p.add_argument("--arch", default="topk")
    p.add_argument("--width", type=int, default=6144)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr-factor", type=float, default=1.0)
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--auxk-norm", choices=("residual", "input"), default="residual")
    p.add_argument("--k-aux", type=int, default=None)
    p.add_argument("--auxk-detach", action="store_true",
                   help="AuxK's codes without gradient: AuxK moves the dead latents' decoder "
                        "rows only (sparsify's fused encoder since 2025)")
    p.add_argument("--auxk-ls-scale", action="store_true",
                   help="AuxK's decode times the detached per-row least-squares scale "
                        "<e, e_hat> / <e_hat, e_hat>, so that AuxK's gradient does not pull the "
                        "codes' overall scale down when e_hat overshoots the residual")
    p.add_argument("--dead-enc-renorm", action="store_true",
                   help="after each step, rescale the encoder columns of the latents dead in "
                        "the window to the median norm of the live latents' columns (an "
                        "untied encoder only; direction kept)")
    p.add_argument("--auxk-enc-tangent", action="store_true",
                   help="remove the radial component of AuxK's gradient on the dead latents' "
                        "encoder columns (AuxK may turn them, not shrink them)")
    p.add_argument("--trace", default=None,
                   help="write per-evaluation per-latent encoder norms, encoder/decoder cosines, "
                        "window silence and AuxK's radial gradient here (torch.save)")
    p.add_argument("--dead-tokens", type=int, default=200_000)
    p.add_argument("--init", default="random")
    p.add_argument("--schedule", choices=("isae", "sparsify"), default="isae")
    p.add_argument("--warmup-frac", type=float, default=0.02)
    p.add_argument("--optimizer", choices=("adam", "lazy-adam"), default="adam")
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--multi-topk", type=float, default=0.0,
                   help="weight of Gao et al.'s Multi-TopK term, the FVU of the top 4k "
                        "latents' decode (sparsify: 1/8; 0: off)")
    p.add_argument("--pca", type=int, default=0,
                   help="project the rows onto their top PCA directions (0: keep all d); "
                        "a cheap stand-in of the same data at a smaller d")
    p.add_argument("--train-rows", type=int, default=1_000_000)
    p.add_argument("--eval-rows", type=int, default=20_000)
    p.add_argument("--evals", type=int, default=8, help="evaluations over the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the final state_dict here")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


@torch.no_grad()
def heldout(model: SparseCoder, X: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(dead fraction, FVU) of ``model`` on the normalised rows X."""
    fired = torch.zeros(model.cfg.d_sae, dtype=torch.bool)
    sse = 0.0
    for i in range(0, len(X), chunk):
        x = X[i : i + chunk].float()
        c = model.encode(x)
        fired[c.idx[c.val != 0]] = True
        sse += float((x - model.decode(c)).double().pow(2).sum())
    var = float((X.double() - X.double().mean(0)).pow(2).sum())
    return 1.0 - fired.float().mean().item(), sse / var


def _latent_slices(model: SparseCoder) -> list[tuple[torch.Tensor, int]]:
    """(parameter, the dimension that indexes latents) for every per-latent parameter."""
    out = [(model.W_dec, 0)]
    if model.W_enc is not None:
        out.append((model.W_enc, 1))
    if isinstance(model.b_enc, torch.nn.Parameter):
        out.append((model.b_enc, 0))
    return out


def lazy_step(model: SparseCoder, opt: torch.optim.Optimizer) -> None:
    """Adam's step, undone for the latents that took no part in this step (an all-zero
    gradient in W_dec's row): their parameters and both moments stay as they were, so a
    latent that fires rarely is not moved by stale momentum, nor kicked by a second moment
    that decayed while it was silent."""
    idle = model.W_dec.grad.abs().sum(1) == 0
    if model.W_enc is not None:
        idle &= model.W_enc.grad.abs().sum(0) == 0
    saved = []
    for p, dim in _latent_slices(model):
        st = opt.state.get(p, {})
        keep = [p.data] + [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st]
        saved.append((dim, keep, [t.index_select(dim, idle.nonzero().squeeze(1)).clone()
                                  for t in keep]))
    opt.step()
    rows = idle.nonzero().squeeze(1)
    for dim, keep, old in saved:
        for t, o in zip(keep, old):
            if t.shape[dim] == len(idle) and len(o.shape) == len(t.shape):
                t.index_copy_(dim, rows, o)


def project(X: torch.Tensor, H: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X and H on the top ``dims`` principal directions of X, rescaled so that a training
    row's mean squared norm is ``dims`` (the normalised space's convention)."""
    Xf = X[:200_000].double()
    _, V = torch.linalg.eigh(Xf.T @ Xf / len(Xf))
    P = V[:, -dims:].float()
    scale = ((X[:200_000].float() @ P).pow(2).sum(1).mean() / dims).sqrt()
    return ((X.float() @ P) / scale).half(), ((H.float() @ P) / scale).half()


def init_model(args, d: int, X: torch.Tensor) -> SparseCoder:
    cfg = SAEConfig.from_arch(args.arch, d_in=d, d_sae=args.width, k=args.k, seed=args.seed)
    model = SparseCoder(cfg)
    with torch.no_grad():
        if args.init == "data":
            g = torch.Generator().manual_seed(args.seed)
            W = X[torch.randperm(len(X), generator=g)[: args.width]].float()
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
            model.W_dec.copy_(W)
            if model.W_enc is not None:
                model.W_enc.copy_(W.T)
        elif args.init.startswith("enc-scale="):
            if model.W_enc is None:
                sys.exit("enc-scale needs an untied encoder")
            model.W_enc.mul_(float(args.init.split("=")[1]))
        elif args.init != "random":
            sys.exit(f"unknown --init {args.init}")
    return model


def load_rows(args) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first --train-rows training rows and every held-out row, normalised (float16),
    projected on --pca directions when asked; and their dimension."""
    acts = ActivationSet(args.activations)
    norm = acts.normalizer()
    mean = torch.as_tensor(norm.mean)

    def normed(x) -> torch.Tensor:
        return ((torch.as_tensor(x).float() - mean) / norm.scale).half()

    X = normed(acts.load("train", max_rows=args.train_rows)["x"])
    H = normed(acts.load("heldout")["x"])
    if args.pca:
        X, H = project(X, H, args.pca)
    return X, H, args.pca or acts.d


def batches(X: torch.Tensor, batch_size: int, seed: int):
    """Batches of X's rows (float32), epoch after epoch, each epoch in a new random order."""
    g = torch.Generator().manual_seed(1000 + seed)
    order, pos = torch.randperm(len(X), generator=g), 0
    while True:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(X), generator=g), 0
        yield X[order[pos : pos + batch_size]].float()
        pos += batch_size


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    X, H, d = load_rows(args)
    model = init_model(args, d, X)
    if model.cfg.encoder_steps:
        # The step below is the amortised TopK alone: an iterative encoder would train as its
        # base without the steps (and be evaluated with them). dead_latents_iter.py runs the
        # trainer's own step.
        sys.exit(f"dead_latents.py: error: {args.arch} has {model.cfg.encoder_steps} "
                 "thresholding steps, which this harness's hand-written step does not run; "
                 "use benchmarks/dead_latents_iter.py")
    tcfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size,
                       warmup_frac=args.warmup_frac)
    lr = args.lr_factor * tcfg.learning_rate(args.width)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, args.beta2))
    steps = tcfg.total_steps()
    k_aux_nominal = args.k_aux or max(d // 2, 1)
    since = torch.zeros(args.width, dtype=torch.long)
    rows = batches(X, args.batch_size, args.seed)
    # As many random training rows as the evaluations' held-out rows: a latent that fires
    # there but not on held-out rows is specific to the training documents, not dead.
    train_probe = torch.randperm(len(X), generator=torch.Generator().manual_seed(7))[
        : min(args.eval_rows, len(H))]
    every = max(steps // args.evals, 1)
    info = {k: v for k, v in vars(args).items() if k not in ("activations", "threads")}
    print(json.dumps({"recipe": info, "lr": lr, "steps": steps, "train_rows": len(X),
                      "heldout_rows": len(H)}), flush=True)
    grad_stats: list[tuple[int, float, float]] = []
    trace: list[dict] = []
    fired_total = torch.zeros(args.width, dtype=torch.long)
    t0 = time.perf_counter()
    for step in range(steps):
        x = next(rows)
        if args.schedule == "sparsify":
            warm = max(int(tcfg.warmup_frac * steps), 1)
            mult = (step + 1) / warm if step < warm else max(steps - step, 0) / max(steps - warm, 1)
        else:
            mult = lr_multiplier(step, steps, tcfg)
        for group in opt.param_groups:
            group["lr"] = lr * mult
        enc = model.encoder_weight
        pre = (x - model.b_dec) @ enc + model.b_enc
        codes = topk_select(pre, args.k, model.cfg.signed)
        x_hat = sparse_decode(codes, model.W_dec) + model.b_dec
        loss_fvu, err = fvu(x, x_hat)
        dead = since >= args.dead_tokens
        n_dead = int(dead.sum())
        aux = x.new_zeros(())
        if n_dead and args.auxk_alpha > 0:
            k_aux = min(k_aux_nominal, n_dead)
            sel = auxk_select(pre, dead, k_aux, model.cfg.signed)
            if args.auxk_detach:
                sel = sel._replace(val=sel.val.detach())
            e_hat = sparse_decode(sel, model.W_dec)
            if args.auxk_ls_scale:
                with torch.no_grad():
                    ed = err.detach()
                    scale = (ed * e_hat).sum(1, keepdim=True) / e_hat.pow(2).sum(
                        1, keepdim=True).clamp_min(1e-12)
                e_hat = e_hat * scale
            if args.auxk_norm == "residual":
                aux = fvu(err.detach(), e_hat)[0]
            else:
                total = (x - x.mean(0)).pow(2).sum()
                aux = min(n_dead / k_aux_nominal, 1.0) * (e_hat - err.detach()).pow(2).sum() / total
        loss = loss_fvu + args.auxk_alpha * aux
        if args.multi_topk:
            wide = topk_select(pre, 4 * args.k, model.cfg.signed)
            loss = loss + args.multi_topk * fvu(x, sparse_decode(wide, model.W_dec) + model.b_dec)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if model.W_enc is not None and n_dead and (args.trace or args.auxk_enc_tangent):
            with torch.no_grad():
                # A window-dead latent's encoder column has AuxK's gradient only (it is not
                # in the batch's top k): its radial part, cos(grad, w) > 0 shrinks it.
                W, G = model.W_enc, model.W_enc.grad
                radial = (G * W).sum(0) / W.pow(2).sum(0).clamp_min(1e-12)
                cosg = (G * W).sum(0) / (G.norm(dim=0) * W.norm(dim=0)).clamp_min(1e-12)
                in_batch = torch.zeros(args.width, dtype=torch.bool)
                in_batch[codes.idx[codes.val != 0]] = True
                gd = cosg[dead & ~in_batch & (G.norm(dim=0) > 0)]
                if len(gd):
                    grad_stats.append((step, float(gd.mean()), float((gd > 0).float().mean())))
                if args.auxk_enc_tangent:
                    G[:, dead] -= radial[dead] * W[:, dead]
        model.project_decoder_grad()
        if args.optimizer == "lazy-adam":
            lazy_step(model, opt)
        else:
            opt.step()
        model.normalize_decoder()
        if args.dead_enc_renorm and model.W_enc is not None and n_dead and n_dead < args.width:
            with torch.no_grad():
                nrm = model.W_enc.norm(dim=0)
                target = nrm[~dead].median()
                model.W_enc[:, dead] *= (target / nrm[dead].clamp_min(1e-12))
        with torch.no_grad():
            fires = torch.zeros(args.width, dtype=torch.long)
            fires.scatter_add_(0, codes.idx.reshape(-1), (codes.val != 0).reshape(-1).long())
            since = torch.where(fires > 0, 0, since + x.shape[0])
            fired_total += fires
        if (step + 1) % every == 0 or step == steps - 1:
            dead_h, fvu_h = heldout(model, H[: args.eval_rows])
            dead_t, _ = heldout(model, X[train_probe])
            extra = {}
            if model.W_enc is not None:
                with torch.no_grad():
                    en = model.W_enc.norm(dim=0)
                    cos = (model.W_enc.T * model.W_dec).sum(1) / en.clamp_min(1e-12)
                    dw = since >= args.dead_tokens
                    def med(t, m):
                        return round(float(t[m].median()), 4) if int(m.sum()) else None
                    extra = {"enc_norm_live": med(en, ~dw), "enc_norm_dead": med(en, dw),
                             "cos_live": med(cos, ~dw), "cos_dead": med(cos, dw)}
                    recent = [g for g in grad_stats if g[0] > step + 1 - every]
                    if recent:
                        extra["auxk_gradcos_dead"] = round(sum(g[1] for g in recent) / len(recent), 4)
                        extra["auxk_shrinks_frac"] = round(sum(g[2] for g in recent) / len(recent), 4)
                    if args.trace:
                        trace.append({"step": step + 1, "enc_norm": en.clone(), "cos": cos.clone(),
                                      "since": since.clone(), "fired_total": fired_total.clone()})
            print(json.dumps({"step": step + 1, "tokens": (step + 1) * args.batch_size,
                              "train_fvu": round(float(loss_fvu.detach()), 4),
                              "auxk": round(float(aux.detach()), 4),
                              "dead_window": round(n_dead / args.width, 4),
                              "dead_heldout": round(dead_h, 4), "fvu_heldout": round(fvu_h, 4),
                              "dead_train_rows": round(dead_t, 4),
                              **extra,
                              "s": round(time.perf_counter() - t0, 1)}), flush=True)
    dead_h, fvu_h = heldout(model, H)
    dead_t, _ = heldout(model, X[torch.randperm(len(X), generator=torch.Generator().manual_seed(7))
                                 [: len(H)]])
    if args.save:
        torch.save(model.state_dict(), args.save)
    if args.trace:
        fired_h = torch.zeros(args.width, dtype=torch.bool)
        with torch.no_grad():
            for i in range(0, len(H), 4096):
                c = model.encode(H[i : i + 4096].float())
                fired_h[c.idx[c.val != 0]] = True
        torch.save({"trace": trace, "grad_stats": grad_stats, "dead_heldout_final": ~fired_h,
                    "args": vars(args)}, args.trace)
    print(json.dumps({"final": True, "dead_heldout": round(dead_h, 4),
                      "dead_train_rows": round(dead_t, 4),
                      "fvu_heldout": round(fvu_h, 4), "heldout_rows": len(H),
                      "tok_per_s": round(args.tokens / (time.perf_counter() - t0))}), flush=True)
    if not math.isfinite(fvu_h):
        sys.exit(1)


if __name__ == "__main__":
    main()
