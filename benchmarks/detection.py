"""Criteria on ``experiment=detection_shapes``: mAP@[.5:.95] before/after pruning to 50 % FLOPs.

For every seed the detector is pre-trained once (``pretrain.cache_dir``) and each criterion
prunes that same network with the same schedule and fine-tune; the table gives the mean ± std
over seeds of mAP before, right after the last round and after fine-tuning, and the paired
difference of the final mAP to influence's with its 95 % t interval. One thread, in sequence:

    python benchmarks/detection.py                       # influence fisher taylor magnitude, seeds 0 1 2
    python benchmarks/detection.py --criteria fisher --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from paired import paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "detection.json"


def run(criterion: str, seed: int, work: Path) -> dict:
    """One ``train.py`` run; its summary.json."""
    out = work / f"{criterion}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=detection_shapes", f"prune={criterion}",
           f"seed={seed}", f"pretrain.cache_dir={work / 'pretrain_cache'}", f"hydra.run.dir={out}"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def mean_std(values: list[float]) -> str:
    """``mean ± std`` in percent (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def table(rows: dict[str, list[dict]]) -> str:
    """A markdown table of mAP before / pruned / after and the paired difference to influence."""
    lines = ["| criterion | FLOPs kept | mAP before | mAP right after pruning | mAP after fine-tune | Δ vs influence [95 % CI] |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    ref = {r["seed"]: r["test_after"] for r in rows.get("influence", [])}
    for name, runs in rows.items():
        after = [r["test_after"] for r in runs if r["seed"] in ref]
        delta = "–"
        if after and name != "influence":
            d, half = paired(after, [ref[r["seed"]] for r in runs if r["seed"] in ref])
            delta = f"{100 * d:+.1f} [{100 * (d - half):+.1f}, {100 * (d + half):+.1f}]"
        pruned = [r["test_pruned"] for r in runs if r["test_pruned"] is not None]
        lines.append(
            f"| {name} | {statistics.mean(r['flops_kept'] for r in runs):.3f} | "
            f"{mean_std([r['test_before'] for r in runs])} | {mean_std(pruned) if pruned else '–'} | "
            f"{mean_std([r['test_after'] for r in runs])} | {delta} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", nargs="+", default=["influence", "fisher", "taylor", "magnitude"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=ROOT / "multirun" / "detection_benchmark")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {c: [] for c in args.criteria}
    for seed in args.seeds:
        for criterion in args.criteria:
            summary = run(criterion, seed, args.work)
            rows[criterion].append(summary)
            print(f"{criterion} seed {seed}: mAP {summary['test_before']:.3f} -> {summary['test_after']:.3f}, "
                  f"FLOPs kept {summary['flops_kept']:.3f}, {summary['wall_s']:.0f}s", flush=True)  # fmt: skip
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"seeds": args.seeds, "runs": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
