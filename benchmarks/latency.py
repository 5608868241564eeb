"""Latency targets versus FLOPs targets: predicted and measured speed-up.

Each model (random weights; latency does not depend on the criterion, so channels are
ranked by their L1 magnitude) is pruned with ``prune_to_target`` to each fraction of its
FLOPs and, separately, of its measured latency (:class:`~lightning_ifprune.latency.LatencyModel`:
layer grids timed with ``torch.utils.benchmark`` and interpolated). For every pruned net the
latency model's prediction is compared with a fresh measurement of the whole net (median of
``torch.utils.benchmark``, eval mode, no grad), taken alternately with the dense net's (3 of
each, medians) so that a busy machine's drift cancels in the measured speed-up. Default: CPU, 1 thread; ResNet-56 and
VGG-16-BN at CIFAR shape (3×32×32, batch 64), MobileNetV2 and ResNet-18 at ImageNet shape
(3×224×224, batch 16; ``--quick`` uses 3×112×112 and says so in the JSON).

Widths: latency targets keep multiples of the device's channel block (``round_to="auto"``,
16 on an AVX-512 CPU), FLOPs targets are not rounded (``--round-to`` overrides both).

Rows ``latency=F+checks`` prune with ``latency_checks=3``: the plan is measured on a copy and
the model refitted to that measurement while it misses (``checked_kept`` is
``prune_to_target``'s own measurement; ``measured_kept`` is this script's fresh one).

The issue's acceptance: ResNet-56 at ``latency=0.5`` measures at most 0.55 of the original,
and every prediction is within 10 % of its measurement. ``kept_error`` compares the predicted
and measured fractions of the dense latency (both ratios to the dense net, so drift between
the model's build and the fresh measurement cancels); ``prediction_error`` compares
milliseconds and carries that drift.

Run: ``python benchmarks/latency.py [--models resnet56,vgg16_bn] [--fractions 0.5,0.7] [--device cpu|cuda]
[--threads 1] [--round-to auto|none|8] [--quick]``. Prints a table and writes ``benchmarks/results/latency.json``
(layer measurements are cached in ``~/.cache/lightning_ifprune/latency``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from lightning_ifprune import prune_to_target, score_channels
from lightning_ifprune.latency import LatencyModel, timer_measure
from lightning_ifprune.latency_env import channel_block as latency_block
from lightning_ifprune.latency_env import device_name, fix_glibc_malloc
from lightning_ifprune.models import build_model
from lightning_ifprune.structure import ChannelStructure

#: name → (zoo name, input shape, batch size, quick input shape)
MODELS = {
    "resnet56": ("resnet56", (3, 32, 32), 64, (3, 32, 32)),
    "vgg16_bn": ("vgg16_bn_cifar", (3, 32, 32), 64, (3, 32, 32)),
    "mobilenet_v2": ("mobilenet_v2", (3, 224, 224), 16, (3, 112, 112)),
    "resnet18": ("resnet18", (3, 224, 224), 16, (3, 112, 112)),
}


def measure_ms(net: torch.nn.Module, shape: tuple[int, ...], batch: int, device: torch.device) -> float:
    """Median ms of one eval forward pass of a random batch (``torch.utils.benchmark``)."""
    net.eval()
    return 1000 * timer_measure(net, torch.randn(batch, *shape, device=device), min_run_time=0.5)


def run_model(
    name: str, fractions: list[float], device: torch.device, quick: bool, round_to: int | str | None
) -> list[dict]:
    arch, shape, batch, quick_shape = MODELS[name]
    shape = quick_shape if quick else shape
    torch.manual_seed(0)
    example = torch.zeros(1, *shape, device=device)
    dense = build_model(arch, num_classes=10 if shape[-1] == 32 else 1000).to(device).eval()
    scores = score_channels(dense, criterion="magnitude", example_inputs=example)
    latency = LatencyModel.build(ChannelStructure.build(dense, example), batch)
    rows = []
    for mode in ("flops", "latency", "latency+checks"):
        resource, checks = mode.split("+")[0], 3 * mode.endswith("checks")
        for fraction in fractions:
            net = build_model(arch, num_classes=10 if shape[-1] == 32 else 1000).to(device).eval()
            net.load_state_dict(dense.state_dict())
            target = f"{resource}={fraction:g}" + ("+checks" if checks else "")
            try:
                report = prune_to_target(net, scores, **{resource: fraction}, latency_model=latency,
                                         round_to=round_to, latency_checks=checks)  # fmt: skip
            except ValueError as err:  # an unreachable target is a result too
                rows.append({"model": name, "target": target, "unreachable": str(err)})
                continue
            pairs = [(measure_ms(dense, shape, batch, device), measure_ms(net, shape, batch, device)) for _ in range(3)]
            dense_ms, measured = (statistics.median(p) for p in zip(*pairs, strict=True))
            predicted = report.latency_after_ms
            rows.append({
                "model": name,
                "input": list(shape),
                "batch": batch,
                "target": target,
                "checked_kept": report.latency_measured_kept,
                "flops_kept": report.flops_after / report.flops_before,
                "predicted_kept": predicted / report.latency_before_ms,
                "kept_error": (predicted / report.latency_before_ms) / (measured / dense_ms) - 1,
                "measured_kept": measured / dense_ms,
                "predicted_ms": predicted,
                "measured_ms": measured,
                "dense_predicted_ms": report.latency_before_ms,
                "dense_measured_ms": dense_ms,
                "prediction_error": predicted / measured - 1,
                "dense_prediction_error": report.latency_before_ms / dense_ms - 1,
                "predicted_speedup": report.latency_before_ms / predicted,
                "measured_speedup": dense_ms / measured,
                "speedup_error": (report.latency_before_ms / predicted) / (dense_ms / measured) - 1,
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--fractions", default="0.5,0.7")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--round-to",
        type=lambda v: v if v == "auto" else None if v == "none" else int(v),
        default="auto",
        help="auto (default: the channel block for latency targets, none for FLOPs), none, or a multiple",
    )
    parser.add_argument("--quick", action="store_true", help="ImageNet models at 3x112x112 instead of 3x224x224")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc_fixed = not args.default_malloc and fix_glibc_malloc()
    device = torch.device(args.device)
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    header = (
        f"{'model':13} {'target':20} {'FLOPs kept':>10} {'pred kept':>9} {'meas kept':>9} {'kept err':>8} "
        f"{'pred ms':>8} {'meas ms':>8} {'ms err':>7} {'meas ×':>7}"
    )
    print(header)
    for name in args.models.split(","):
        for r in run_model(name, fractions, device, args.quick, args.round_to):
            rows.append(r)
            if "unreachable" in r:
                print(f"{r['model']:13} {r['target']:20} {r['unreachable']}", flush=True)
                continue
            print(
                f"{r['model']:13} {r['target']:20} {r['flops_kept']:10.3f} {r['predicted_kept']:9.3f} "
                f"{r['measured_kept']:9.3f} {100 * r['kept_error']:+7.1f}% {r['predicted_ms']:8.2f} "
                f"{r['measured_ms']:8.2f} {100 * r['prediction_error']:+6.1f}% {r['measured_speedup']:7.2f}",
                flush=True,
            )
    result = {
        "rows": rows,
        "max_abs_prediction_error": max(
            (abs(r["prediction_error"]) for r in rows if "unreachable" not in r), default=None
        ),
        "max_abs_speedup_error": max((abs(r["speedup_error"]) for r in rows if "unreachable" not in r), default=None),
        "max_abs_kept_error": max((abs(r["kept_error"]) for r in rows if "unreachable" not in r), default=None),
        "quick": args.quick,
        "round_to": args.round_to,
        "channel_block": latency_block(device),
        "glibc_malloc_fixed": malloc_fixed,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device_name": device_name(device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
