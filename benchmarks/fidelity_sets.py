"""Set fidelity: which criterion's 50 %-FLOPs selection really costs least after retraining? (spec §7)

Single-channel fidelity (``fidelity.py``) asks whether a score ranks one removal at a time.
Pruning decides a *set*, so this benchmark scores what it actually decides. Per seed, on the
same float64 tanh CNN, data subset and converged base as ``fidelity.py``:

* every criterion scores the base once (same data, ``weight_decay=λ``); the library's global
  selection (score ÷ √FLOPs, as ``prune=...`` does) picks the set of channels that brings the
  model to 50 % of its FLOPs;
* the set is removed exactly (masks 0, producer rows, biases and consumer columns held at 0)
  and the rest retrained by preconditioned L-BFGS to ‖∇L‖ ≤ ``--tol``, twice: from the base
  weights and from the base + N(0, σ²) (the test–retest spread);
* reported: the objective right after removal, after retraining (mean of the two runs, their
  largest gap), the test accuracy after retraining, and per criterion the paired difference of
  the retrained loss to the best criterion over seeds with a 95 % t confidence interval.

Explicit-matrix references (the exact Schur second-order prediction, the paper score with the
exact inverse) select sets too. Run ``python benchmarks/fidelity_sets.py [--seeds 5] [--quick]``;
results go to ``benchmarks/results/fidelity_sets.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lightning_ifprune as lip
from lightning_ifprune.selection import select_channels
from lightning_ifprune.structure import ChannelStructure

sys.path.insert(0, str(Path(__file__).parent))
import fidelity as fid  # noqa: E402
from paired import mean_ci  # noqa: E402
from peers import TPGroupMagnitude, TPGroupTaylor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity_sets.json"
TARGET = 0.5
REFERENCES = ("exact Schur −g+½(H_mm−H_mw H_ww⁻¹ H_wm)", "exact paper |H_mw H_ww⁻¹ H_wm 1|")


def criteria(lam: float, seed: int) -> list[tuple[str, lip.Criterion]]:
    """The library's criteria, the previous default, a retrained estimator and Torch-Pruning's rows."""
    inf = {"weight_decay": lam}
    return [
        ("magnitude (L1)", lip.Magnitude(p=1)),
        ("magnitude per group", lip.Magnitude(per_group=True)),
        ("tp GroupMagnitude", TPGroupMagnitude()),
        ("tp GroupTaylor", TPGroupTaylor()),
        ("taylor", lip.Taylor()),
        ("fisher", lip.Fisher()),
        ("random", lip.Random(seed=seed)),
        ("loss_drop (no retrain)", lip.LossDrop()),
        (fid.DEFAULT_LABEL, lip.Influence(**inf)),
        (fid.PREVIOUS_DEFAULT, lip.Influence(**inf, inverse="cg", micro_batches=2)),
        (
            "influence retrained/exact/cg50 δ=1e-3",
            lip.Influence(**inf, score="retrained", probes="exact", inverse="cg", cg_iters=50, damping=1e-3),
        ),
    ]


def split(flat: np.ndarray, structure: ChannelStructure) -> dict[str, torch.Tensor]:
    """A flat score vector (structure order) as per-group tensors."""
    out, start = {}, 0
    for name, group in structure.groups.items():
        out[name] = torch.as_tensor(flat[start : start + group.size])
        start += group.size
    return out


def flat_indices(plan: dict[str, list[int]], structure: ChannelStructure) -> list[int]:
    """A selection plan as flat channel indices (structure order)."""
    out, start = [], 0
    for name, group in structure.groups.items():
        out += [start + k for k in plan.get(name, [])]
        start += group.size
    return sorted(out)


def remove_set(
    obj: fid.FastObjective, v: torch.Tensor, dead: list[torch.Tensor], ks: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels ``ks`` removed from weights v: (free weight indices, mask, start weights)."""
    keep = torch.ones(obj.num_params, dtype=torch.bool)
    mask = torch.ones(obj.num_masks, dtype=fid.DTYPE)
    for k in ks:
        keep[dead[k]] = False
        mask[k] = 0.0
    start = v.clone()
    start[~keep] = 0.0
    return keep.nonzero().flatten(), mask, start


def run_seed(seed: int, cfg: fid.Config, say) -> dict[str, Any]:
    """Base, every criterion's set at 50 % FLOPs, two retrains per set."""
    x, y, x_test, y_test = fid.load_data(seed, cfg.n_train)
    torch.manual_seed(seed)
    model = fid.DigitsCNN(cfg.widths).to(fid.DTYPE)
    structure = ChannelStructure.build(model, x[:2])
    obj = fid.FastObjective(model, x, y, cfg.weight_decay)
    test_obj = fid.FastObjective(model, x_test, y_test, cfg.weight_decay)
    dead = fid.removed_weights(structure, obj)
    v0 = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    fid.check_parity(model, structure, obj, v0, dead)
    base, grad_full, hess, _ = fid.train_base(obj, v0, cfg)
    nn.utils.vector_to_parameters(base.v, model.parameters())
    p = obj.num_params
    h_ww = hess[:p, :p]
    say(f"  seed {seed}: base loss {base.loss:.6f}, ‖g‖ {base.grad_norm:.1e}")

    sets: dict[str, list[int]] = {}
    for label, criterion in criteria(cfg.weight_decay, seed):
        scores = lip.score_channels(model, [(x, y)], criterion=criterion, loss_fn=F.cross_entropy, example_inputs=x[:2])
        sets[label] = flat_indices(select_channels(structure, scores, "flops", TARGET, "sqrt"), structure)
    refs = fid.exact_references(grad_full, hess, p, cfg.weight_decay, 1e-3)
    for label in REFERENCES:
        sets[label] = flat_indices(
            select_channels(structure, split(refs[label], structure), "flops", TARGET), structure
        )

    gen = torch.Generator().manual_seed(20_000 + seed)
    noise = cfg.sigma * torch.randn(p, generator=gen, dtype=fid.DTYPE)
    out: dict[str, Any] = {"seed": seed, "base_loss": base.loss, "n_channels": obj.num_masks, "rows": {}}
    for label, ks in sets.items():
        fits = []
        for start_v in (base.v, base.v + noise):
            free, mask, start = remove_set(obj, start_v, dead, ks)
            prec = fid.Precond(h_ww[free][:, free])
            fits.append(fid.minimize(obj, start, mask, free, prec, cfg.tol, cfg.max_evals_retrain, cfg.history))
        free, mask, start = remove_set(obj, base.v, dead, ks)
        removed_loss, _ = obj.loss_and_grad(start, mask)
        acc = float((test_obj.logits(fits[0].v, mask).argmax(1) == y_test).double().mean())
        losses = [f.loss for f in fits]
        out["rows"][label] = {
            "removed": ks, "n_removed": len(ks), "loss_removed": removed_loss,
            "loss_retrained": float(np.mean(losses)), "run_gap": abs(losses[0] - losses[1]),
            "converged": [f.converged for f in fits], "grad_norms": [f.grad_norm for f in fits],
            "test_acc_retrained": acc,
        }  # fmt: skip
        say(f"  seed {seed}: {label:52s} {len(ks):2d} removed, loss {removed_loss:.4f} → {np.mean(losses):.6f}")
    return out


def summarize(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: means over seeds and the paired retrained-loss difference to the best row."""
    labels = list(per_seed[0]["rows"])
    loss = {r: np.array([s["rows"][r]["loss_retrained"] for s in per_seed]) for r in labels}
    best = min(labels, key=lambda r: loss[r].mean())
    table = []
    for r in labels:
        diff = loss[r] - loss[best]
        _, _, half = mean_ci(diff)
        rows = [s["rows"][r] for s in per_seed]
        table.append({
            "criterion": r, "best": best, "n": len(diff),
            "n_removed": float(np.mean([x["n_removed"] for x in rows])),
            "loss_removed": float(np.mean([x["loss_removed"] for x in rows])),
            "loss_retrained": float(loss[r].mean()), "loss_retrained_std": float(loss[r].std(ddof=1)) if len(diff) > 1 else math.nan,
            "delta": float(diff.mean()), "delta_ci": half,
            "significant": bool(r != best and not math.isnan(half) and diff.mean() > half),
            "test_acc": float(np.mean([x["test_acc_retrained"] for x in rows])),
            "max_run_gap": float(max(x["run_gap"] for x in rows)),
            "not_converged": int(sum(not c for x in rows for c in x["converged"])),
        })  # fmt: skip
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| criterion | channels removed | loss after removal | loss after retrain | Δ vs best [95 % CI] | significant? "
        "| test acc after retrain |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in table:
        if e["criterion"] == e["best"]:
            delta, sig = "best", "—"
        else:
            d, h = e["delta"], e["delta_ci"]
            delta, sig = f"{d:+.4f} [{d - h:+.4f}, {d + h:+.4f}]", "**yes**" if e["significant"] else "no"
        name = e["criterion"].replace("|", "\\|")
        lines.append(f"| {name} | {e['n_removed']:.1f} | {e['loss_removed']:.4f} | "
                     f"{e['loss_retrained']:.4f} ± {e['loss_retrained_std']:.4f} | {delta} | {sig} | "
                     f"{100 * e['test_acc']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the CLI, run the seeds, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="150 training images, 2 seeds (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = fid.Config(seeds=2 if args.quick else args.seeds, quick=args.quick, n_train=150 if args.quick else 500)
    start = time.perf_counter()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    per_seed = [run_seed(seed, cfg, say) for seed in range(cfg.seeds)]
    table = summarize(per_seed)
    wall = time.perf_counter() - start
    command = "python benchmarks/fidelity_sets.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(table)
    print(md)
    not_converged = sum(e["not_converged"] for e in table)
    print(f"retrains not converged (‖∇L‖ > {cfg.tol:g}): {not_converged}/{2 * len(table) * cfg.seeds}")
    print(f"wall time {wall:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "wall_s": wall, "target_flops": TARGET, "settings": vars(cfg),
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "table": table, "per_seed": per_seed}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
