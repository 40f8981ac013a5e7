"""dead_latents.py's loop with the trainer's own step (SAEStepper._body): model(x, dead,
aux_detach) -> SparseCoder.loss with auxk_weight, so encoder_steps (IHT) are applied in
training, latents count as firing in the *final* codes (model.fired), and AuxK is
the library's (incl. min(n_dead/k_aux,1)). Also tracks, without gradient, which latents
the amortised TopK (before the IHT steps) selects, to see whether IHT is what silences them.
Reuses parse/heldout/project/init_model from benchmarks/dead_latents.py (unmodified)."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dead_latents.py beside it
import dead_latents as H0
import torch

from isae.models.config import TrainConfig
from isae.models.reference import auxk_weight, topk_select
from isae.training.trainer import lr_multiplier


@torch.no_grad()
def heldout2(model, X, chunk=4096):
    """dead fraction (final codes), FVU, dead fraction by the amortised TopK codes."""
    N = model.cfg.d_sae
    fired = torch.zeros(N, dtype=torch.bool)
    fired0 = torch.zeros(N, dtype=torch.bool)
    sse = 0.0
    for i in range(0, len(X), chunk):
        x = X[i : i + chunk].float()
        c = model.encode(x)
        fired[c.idx[c.val != 0]] = True
        c0 = topk_select(model.pre_acts(x), model.cfg.k, model.cfg.signed)
        fired0[c0.idx[c0.val != 0]] = True
        sse += float((x - model.decode(c)).double().pow(2).sum())
    var = float((X.double() - X.double().mean(0)).pow(2).sum())
    return 1 - fired.float().mean().item(), sse / var, 1 - fired0.float().mean().item()


def main():
    extra = [a for a in sys.argv[1:] if a.startswith("--encoder-steps=")]
    argv = [a for a in sys.argv[1:] if a not in extra]
    args = H0.parse(argv)
    torch.set_num_threads(1)
    X, Hx, d = H0.load_rows(args)
    model = H0.init_model(args, d, X)
    if extra:
        model.cfg.encoder_steps = int(extra[0].split("=")[1])
    tcfg = TrainConfig(
        tokens=args.tokens,
        batch_size=args.batch_size,
        warmup_frac=args.warmup_frac,
        auxk_alpha=args.auxk_alpha,
        dead_tokens=args.dead_tokens,
        auxk_detach="tied" if args.auxk_detach else "none",
    )
    lr = args.lr_factor * tcfg.learning_rate(args.width)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, args.beta2), eps=1e-8)
    steps = tcfg.total_steps()
    since = torch.zeros(args.width, dtype=torch.long)
    since0 = since.clone()
    rows = H0.batches(X, args.batch_size, args.seed)
    every = max(steps // args.evals, 1)
    print(
        json.dumps(
            {
                "recipe": {k: v for k, v in vars(args).items() if k != "activations"},
                "encoder_steps": model.cfg.encoder_steps,
                "signed": model.cfg.signed,
                "tied": model.cfg.tied,
                "bias": model.cfg.bias,
                "iht_step": model.cfg.iht_step,
                "iht_gradient": model.cfg.iht_gradient,
                "auxk_detach": tcfg.auxk_detaches(model.cfg),
                "lr": lr,
                "steps": steps,
                "train_rows": len(X),
                "heldout_rows": len(Hx),
            }
        ),
        flush=True,
    )
    t0 = time.perf_counter()
    for step in range(steps):
        x = next(rows)
        for grp in opt.param_groups:
            grp["lr"] = lr * lr_multiplier(step, steps, tcfg)
        dead = since >= tcfg.dead_tokens
        out = model(x, dead=dead, aux_detach=tcfg.auxk_detaches(model.cfg))
        alpha = auxk_weight(tcfg.auxk_alpha, tcfg.auxk_norm, x, out.x_hat, dead, max(d // 2, 1))
        loss = model.loss(x, out, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        model.project_decoder_grad()
        opt.step()
        model.normalize_decoder()
        with torch.no_grad():
            fires = model.fired(out.codes)
            since = torch.where(fires > 0, 0, since + x.shape[0])
            c0 = topk_select(
                model.pre_acts(x), model.cfg.k, model.cfg.signed
            )  # after the step: approx
            since0 = torch.where(model.fired(c0) > 0, 0, since0 + x.shape[0])
        if (step + 1) % every == 0 or step == steps - 1:
            dh, fh, dh0 = heldout2(model, Hx[: args.eval_rows])
            print(
                json.dumps(
                    {
                        "step": step + 1,
                        "tokens": (step + 1) * args.batch_size,
                        "train_fvu": round(float(out.fvu), 4),
                        "auxk": round(float(out.auxk), 4),
                        "dead_window": round(float(dead.float().mean()), 4),
                        "dead_window_amortised": round(
                            float((since0 >= tcfg.dead_tokens).float().mean()), 4
                        ),
                        "dead_heldout20k": round(dh, 4),
                        "dead20k_amortised": round(dh0, 4),
                        "fvu_heldout20k": round(fh, 4),
                        "s": round(time.perf_counter() - t0, 1),
                    }
                ),
                flush=True,
            )
    dh, fh, dh0 = heldout2(model, Hx)
    if args.save:
        torch.save(
            {
                "state": model.state_dict(),
                "since": since,
                "since0": since0,
                "d": d,
                "arch": args.arch,
                "width": args.width,
                "k": args.k,
            },
            args.save,
        )
    print(
        json.dumps(
            {
                "final": True,
                "dead_heldout": round(dh, 4),
                "dead_heldout_amortised": round(dh0, 4),
                "fvu_heldout": round(fh, 4),
                "heldout_rows": len(Hx),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
