"""Sweep of torchvision and timm classifiers: refused with a reason, or pruned correctly.

For each model (random init, small inputs) :func:`check_model` either records the
:class:`~lightning_ifprune.structure.UnsupportedModelError` it raises, or checks that masking
random channels equals removing them (eval mode), prunes it to half its FLOPs with the
magnitude criterion (Taylor where attention heads are groups), measures the FLOPs with PyTorch's counter and runs one training step.
Any other error or a wrong result raises. Torch-Pruning's own ``MagnitudePruner`` runs on the
same model for comparison. ``python -m lightning_ifprune.zoo_report [--out FILE]`` prints a
markdown table and writes the results as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_ifprune.criteria import score_channels
from lightning_ifprune.functional import prune_to_target
from lightning_ifprune.measure import count_macs
from lightning_ifprune.models.zoo import build_model
from lightning_ifprune.structure import NORM_TYPES, ChannelStructure, UnsupportedModelError, channel_masks
from lightning_ifprune.surgery import prune_channels

NUM_CLASSES = 10


@dataclass(frozen=True)
class ZooModel:
    """One model of the sweep: where it comes from, how to build it, its input size."""

    name: str
    source: str  # "torchvision" or "timm"
    size: int = 64
    slow: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    criterion: str = "magnitude"  # "taylor" where head groups have no producer rows to measure

    @property
    def id(self) -> str:
        """``source/name``."""
        return f"{self.source}/{self.name}"

    def build(self) -> nn.Module:
        """The model, randomly initialised (seeded)."""
        torch.manual_seed(0)
        name = self.name if self.source == "torchvision" else f"timm/{self.name}"
        return build_model(name, num_classes=NUM_CLASSES, in_channels=3, **self.kwargs)


#: The sweep's limit: every torchvision classification model with at most this many parameters.
MAX_PARAMS = 150_000_000
#: Per model: what differs from the default (64×64 input, magnitude criterion); "slow" is set
#: for models above 20M parameters.
OVERRIDES: dict[str, dict[str, Any]] = {
    "googlenet": {"kwargs": {"aux_logits": True, "init_weights": True}},
    "inception_v3": {"size": 299, "kwargs": {"aux_logits": True, "init_weights": True}},  # the aux head needs 299
    "maxvit_t": {"size": 224},  # 7×7 windows at every stage
    "vit_b_16": {"size": 32, "kwargs": {"image_size": 32}, "criterion": "taylor"},
    "vit_b_32": {"size": 32, "kwargs": {"image_size": 32}, "criterion": "taylor"},
}
SMALL_INPUT = ("vgg", "densenet", "convnext")  # 32×32 is enough and much cheaper


def torchvision_models() -> list[ZooModel]:
    """Every torchvision classification model with at most :data:`MAX_PARAMS` parameters (the
    count from its weights' metadata: nothing is downloaded)."""
    import torchvision.models as tvm

    specs = []
    for name in tvm.list_models(module=tvm):
        params = tvm.get_model_weights(name).DEFAULT.meta["num_params"]
        if params > MAX_PARAMS:
            continue
        options = {"size": 32} if name.startswith(SMALL_INPUT) else {}
        options.update(OVERRIDES.get(name, {}))
        specs.append(ZooModel(name, "torchvision", slow=params > 20_000_000 or options.get("size", 64) > 64, **options))
    return specs


TORCHVISION = torchvision_models()
#: Popular timm CNNs (and one ViT); random init, 64×64 unless said otherwise.
TIMM = [
    ZooModel("resnet18", "timm"),
    ZooModel("resnet50", "timm", slow=True),
    ZooModel("seresnet50", "timm", slow=True),
    ZooModel("resnext50_32x4d", "timm", slow=True),
    ZooModel("res2net50_26w_4s", "timm", slow=True),
    ZooModel("efficientnet_b0", "timm", slow=True),
    ZooModel("efficientnet_lite0", "timm"),
    ZooModel("mobilenetv2_100", "timm"),
    ZooModel("mobilenetv3_large_100", "timm"),
    ZooModel("regnety_016", "timm", slow=True),
    ZooModel("densenet121", "timm", size=32, slow=True),
    ZooModel("ghostnet_100", "timm"),
    ZooModel("cspresnet50", "timm", slow=True),
    ZooModel("mixnet_s", "timm"),
    ZooModel("rexnet_100", "timm"),
    ZooModel("dla34", "timm"),
    ZooModel("dpn68", "timm"),
    ZooModel("hrnet_w18_small", "timm", slow=True),
    ZooModel("convnext_nano", "timm", size=32),
    ZooModel("vit_small_patch16_224", "timm", size=32, kwargs={"img_size": 32}, criterion="taylor"),
]
MODELS = TORCHVISION + TIMM


@dataclass
class ZooResult:
    """What :func:`check_model` found for one model."""

    model: str
    source: str
    status: str  # "pruned" or "refused"
    reason: str = ""
    groups: int = 0
    channels: int = 0
    max_mask_error: float = 0.0
    flops_before: int = 0
    flops_after: int = 0
    flops_target: float = 0.0
    torch_pruning: str = ""
    seconds: float = 0.0  # our check's wall time (Torch-Pruning's run not included)


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm (subclasses too),
    LayerNorm, and layer scale (near 1, so that every residual branch counts in the output); random
    weights for a zero-initialised classifier (torchvision's ViT), whose output would vanish."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.in_features**-0.5)
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            for name, p in m.named_parameters(recurse=False):
                if name in ("layer_scale", "gamma") and not isinstance(m, (nn.LayerNorm, *NORM_TYPES)):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            if isinstance(m, NORM_TYPES) and m.affine and m.track_running_stats:
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def random_plan(structure: ChannelStructure, seed: int = 0) -> dict[str, list[int]]:
    """Up to half of each group's channels, at random (each group keeps its minimum)."""
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for name, group in structure.groups.items():
        most = min(group.size - group.min_keep, group.size // 2)
        k = int(torch.randint(0, most + 1, (1,), generator=gen)) if most > 0 else 0
        if k:
            plan[name] = torch.randperm(group.size, generator=gen)[:k].tolist()
    return plan


def _logits(out: Any) -> torch.Tensor:
    """The main output (torchvision's GoogLeNet returns a named tuple in training mode)."""
    return out[0] if isinstance(out, tuple) else out


def mask_vs_removal(model: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[ChannelStructure, float]:
    """Masking a random plan equals removing it (eval mode, on a copy); the structure and the relative error."""
    net = copy.deepcopy(model).eval()
    structure = ChannelStructure.build(net, x[:1])
    plan = random_plan(structure, seed)
    masks = {n: torch.ones(g.size) for n, g in structure.groups.items()}
    for name, idxs in plan.items():
        masks[name][idxs] = 0
    with torch.no_grad(), channel_masks(structure, masks):
        masked = _logits(net(x))
    prune_channels(structure, plan)
    with torch.no_grad():
        pruned = _logits(net(x))
    scale = pruned.abs().max().item()
    if not scale > 1e-6:
        raise AssertionError(f"the pruned model's output vanished (max |y| = {scale})")
    error = (masked - pruned).abs().max().item() / scale
    if error > 1e-4:
        raise AssertionError(f"masked and physically pruned outputs differ: relative error {error:.2e}")
    return structure, error


def flops_target(structure: ChannelStructure, wanted: float = 0.5) -> float:
    """``wanted``, or halfway into the prunable share when ``wanted`` is out of reach."""
    total = structure.cost()[0]
    floor = structure.cost({n: g.size - g.min_keep for n, g in structure.groups.items()})[0]
    reachable = floor / total
    return wanted if reachable < wanted - 0.02 else (1 + reachable) / 2


def _cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(_logits(outputs), targets)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One training-mode forward and backward; every gradient finite."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    outs = list(out) if isinstance(out, tuple) else [out]
    if tuple(outs[0].shape) != (x.shape[0], NUM_CLASSES):
        raise AssertionError(f"output shape {tuple(outs[0].shape)} after pruning")
    sum(o.float().square().mean() for o in outs).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise AssertionError(f"non-finite gradients after pruning: {bad[:3]}")


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Layers producing the class logits (Linear/Conv with ``NUM_CLASSES`` outputs, aux heads too)."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)
    ]


def torch_pruning_result(spec: ZooModel, limit_s: int = 60, memory_gb: int = 8) -> str:
    """Torch-Pruning 1.6.1's ``MagnitudePruner`` at ratio 0.5 on the same model: ran or failed.

    It runs in a forked process allowed ``memory_gb`` of address space beyond what it
    inherits, and ``limit_s`` seconds: its grouping can exhaust memory (MaxViT) or not finish (ReXNet)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_tp_child, args=(spec, memory_gb, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(limit_s):
            return f"failed: did not finish within {limit_s} s"
        return receive.recv()
    except EOFError:
        return f"failed: its process died (exit code {child.exitcode}; over {memory_gb} GB?)"
    finally:
        child.kill()
        child.join()


def _tp_child(spec: ZooModel, memory_gb: int, send: Any) -> None:
    """In the forked process: cap the memory, prune with Torch-Pruning, send the outcome."""
    page = os.sysconf("SC_PAGE_SIZE")
    inherited = int(Path("/proc/self/statm").read_text().split()[0]) * page  # the parent's address space
    limit = inherited + (memory_gb << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        send.send(_tp_prune(spec.build(), torch.randn(1, 3, spec.size, spec.size)))
    except BaseException as err:  # noqa: BLE001 - the comparison records any failure
        send.send(f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}")


def _tp_prune(model: nn.Module, x: torch.Tensor) -> str:
    """Prune with Torch-Pruning; \"ran\" or why the output is wrong."""
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        ignored_layers=classifier_layers(model),
    )
    pruner.step()
    model.eval()
    with torch.no_grad():
        out = _logits(model(x))
    if tuple(out.shape) != (1, NUM_CLASSES):
        return f"failed: output shape {tuple(out.shape)}"
    return "ran"


def check_model(spec: ZooModel, compare: bool = False) -> ZooResult:
    """Refused with :class:`UnsupportedModelError`, or pruned correctly (else it raises)."""
    model = spec.build()
    randomize_norms(model)
    x = torch.randn(2, 3, spec.size, spec.size)
    result = ZooResult(spec.name, spec.source, "pruned")
    if compare:
        result.torch_pruning = torch_pruning_result(spec)
    start = time.perf_counter()
    try:
        structure, result.max_mask_error = mask_vs_removal(model, x)
    except UnsupportedModelError as err:
        result.status, result.reason = "refused", str(err)
        result.seconds = time.perf_counter() - start
        return result
    result.groups, result.channels = len(structure.groups), sum(structure.widths().values())
    result.flops_target = flops_target(structure)
    result.flops_before = count_macs(model, x[:1])
    if spec.criterion == "magnitude":
        scores = score_channels(model, criterion="magnitude", example_inputs=x[:1])
    else:
        y = torch.randint(0, NUM_CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(0))
        scores = score_channels(model, [(x, y)], criterion=spec.criterion, loss_fn=_cross_entropy)
    prune_to_target(model, scores, flops=result.flops_target)
    result.flops_after = count_macs(model, x[:1])
    if result.flops_after > (result.flops_target + 0.01) * result.flops_before:
        raise AssertionError(
            f"{spec.id}: {result.flops_after / result.flops_before:.3f} of the FLOPs left, "
            f"target {result.flops_target:.3f}"
        )
    train_step(model, x)
    result.seconds = time.perf_counter() - start
    return result


def _reason(result: ZooResult) -> str:
    lines = [ln.strip(" -") for ln in result.reason.splitlines() if ln.strip()]
    first = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
    return first[:110] + ("…" if len(first) > 110 else "")


def markdown_table(results: Sequence[ZooResult]) -> str:
    """One row per model: groups, channels, our status, Torch-Pruning's."""
    rows = [
        "| model | source | groups | prunable channels | status | FLOPs left | Torch-Pruning 1.6.1 |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for r in results:
        if r.status == "pruned":
            status, left = "pruned correctly", f"{r.flops_after / r.flops_before:.2f}"
            if r.flops_target > 0.5:  # flops_target(): halfway into the prunable share
                status += f" (50 % out of reach: {200 * (1 - r.flops_target):.1f} % of FLOPs prunable)"
        else:
            status, left = f"refused: {_reason(r)}".replace("|", "\\|"), "–"
        tp_status = r.torch_pruning.replace("|", "\\|")
        rows.append(f"| {r.model} | {r.source} | {r.groups} | {r.channels} | {status} | {left} | {tp_status} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo.json"))
    parser.add_argument(
        "--models", nargs="*", help="source/name ids to run (default: all); the others keep their results in --out"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = [s for s in MODELS if not args.models or s.id in args.models]
    kept: dict[str, ZooResult] = {}
    if args.models and args.out.is_file():  # re-run some models: the others keep their results
        kept = {f"{r['source']}/{r['model']}": ZooResult(**r) for r in json.loads(args.out.read_text())}
    for spec in specs:
        done = kept[spec.id] = check_model(spec, compare=True)
        print(f"{spec.id}: {done.status} ({done.seconds:.1f} s); Torch-Pruning {done.torch_pruning}", file=sys.stderr)
    results = [kept[s.id] for s in MODELS if s.id in kept]
    print(markdown_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
