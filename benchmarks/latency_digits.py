"""Latency- versus FLOPs-targeted pruning on digits, end to end (issue: "at the same accuracy
budget, latency-targeted pruning is at least as fast and no less accurate").

Per seed, ``train.py prune=influence`` (the default run of ``make train``: pre-train, three
pruning rounds, fine-tune; pre-trained weights shared per seed through ``pretrain.cache_dir``)
runs three times:

- ``flops=0.5``: half the FLOPs (the default target);
- ``latency=matched``: a latency target equal to the latency the ``flops=0.5`` run *measured*
  (same speed: which net is more accurate?);
- ``latency=0.5``: half the predicted latency (the same fraction, of time instead of FLOPs).

Each run's ``summary.json`` gives the test accuracy after fine-tune and the measured latency
(batch 64, 1 thread, median of 20 calls, before and after). Differences to ``flops=0.5`` are
paired per seed with a 95 % t confidence interval.

Run: ``python benchmarks/latency_digits.py [--seeds 3] [--out benchmarks/results/latency_digits.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from paired import paired  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("flops=0.5", "latency=matched", "latency=0.5")


def run_train(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """``train.py prune=influence <overrides>`` in a subprocess; its summary.json."""
    cmd = [sys.executable, str(ROOT / "train.py"), "prune=influence", *overrides, f"hydra.run.dir={out_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latency_digits.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "pretrained"
        for seed in range(args.seeds):
            base = [f"seed={seed}", f"pretrain.cache_dir={cache}"]
            flops = run_train(base, Path(tmp) / f"s{seed}_flops")
            matched = flops["latency_after_ms"] / flops["latency_before_ms"]
            targets = {"latency=matched": matched, "latency=0.5": 0.5}
            runs["flops=0.5"].append(flops)
            for row, target in targets.items():
                over = [*base, "prune.target_flops=null", f"prune.target_latency={target:.4f}"]
                runs[row].append(run_train(over, Path(tmp) / f"s{seed}_{row.replace('=', '_')}"))
            for row in ROWS:
                s = runs[row][-1]
                print(f"seed {seed} {row:16} acc {100 * s['test_acc_after']:.2f} latency kept "
                      f"{s['latency_after_ms'] / s['latency_before_ms']:.3f} FLOPs kept {s['flops_kept']:.3f}",
                      file=sys.stderr, flush=True)  # fmt: skip
    table = []
    ref_acc = [s["test_acc_after"] for s in runs["flops=0.5"]]
    ref_lat = [s["latency_after_ms"] / s["latency_before_ms"] for s in runs["flops=0.5"]]
    for row in ROWS:
        acc = [s["test_acc_after"] for s in runs[row]]
        lat = [s["latency_after_ms"] / s["latency_before_ms"] for s in runs[row]]
        pred = [s["latency_predicted_after_ms"] / s["latency_predicted_before_ms"]
                if s.get("latency_predicted_before_ms") else math.nan for s in runs[row]]  # fmt: skip
        d_acc, ci_acc = paired(acc, ref_acc)
        d_lat, ci_lat = paired(lat, ref_lat)
        table.append(dict(
            row=row, n=len(acc), acc_mean=float(np.mean(acc)), acc_std=float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            latency_kept_mean=float(np.mean(lat)), predicted_latency_kept_mean=float(np.nanmean(pred)) if row != "flops=0.5" else None,
            flops_kept_mean=float(np.mean([s["flops_kept"] for s in runs[row]])),
            delta_acc=d_acc, delta_acc_ci=ci_acc, delta_latency_kept=d_lat, delta_latency_kept_ci=ci_lat,
        ))  # fmt: skip
    print(
        "| target | n | test acc % | measured latency kept | FLOPs kept | Δ acc vs flops=0.5 (95 % CI) | Δ latency kept |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['row']} | {t['n']} | {100 * t['acc_mean']:.2f} ± {100 * t['acc_std']:.2f} | "
              f"{t['latency_kept_mean']:.3f} | {t['flops_kept_mean']:.3f} | "
              f"{100 * t['delta_acc']:+.2f} ± {100 * t['delta_acc_ci']:.2f} | "
              f"{t['delta_latency_kept']:+.3f} ± {t['delta_latency_kept_ci']:.3f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/latency_digits.py --seeds " + str(args.seeds),
        "table": table, "runs": runs, "wall_s": time.perf_counter() - t0,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
