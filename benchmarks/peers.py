"""Torch-Pruning 1.6.1's own importance criteria as comparison rows (benchmarks only).

Each of our groups is mapped to Torch-Pruning's dependency group of its first producer and
scored by Torch-Pruning's importance object (its defaults: L2, mean over the group's layers,
each group's scores divided by their mean). Our selection and cost normalisation then prune to
the same FLOPs target as every other row, so only the scores differ. ``GroupTaylorImportance``
reads the weight gradients of the loss summed over the scoring batches; the model's gradients
and buffers (BatchNorm statistics) are restored afterwards.

``GroupHessianImportance`` is not a row: in Torch-Pruning 1.6.1 its ``accumulate_grad`` tests
``name not in self._accu_grad`` on a dict keyed by parameters, so every sample overwrites the
sum and the counter stays at 1: the score uses the last sample's squared gradient only.
``python benchmarks/peers.py`` measures what that costs: the Spearman correlation, per group,
between the shipped importance and the same importance with the accumulation fixed, on a
digits-trained small CNN, written to ``benchmarks/results/tp_hessian.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
import torch_pruning as tp
from scipy import stats

import lightning_ifprune as lip


class TorchPruningImportance(lip.Criterion):
    """Base: scores every group with ``make()``, a Torch-Pruning importance object."""

    name: ClassVar[str] = "tp"

    @staticmethod
    def make() -> tp.importance.Importance:
        raise NotImplementedError

    def __call__(self, structure, batches, loss) -> dict[str, torch.Tensor]:
        model = structure.model
        grads = {p: p.grad for p in model.parameters()}
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        try:
            if self.needs_data:
                model.zero_grad(set_to_none=True)
                for batch in batches:
                    loss(model, batch).backward()
            importance = self.make()
            scores = {}
            for name, group in structure.groups.items():
                module = model.get_submodule(group.producers[0])
                prune = structure.graph.get_pruner_of_module(module).prune_out_channels
                tp_group = structure.graph.get_pruning_group(module, prune, list(range(group.size)))
                value = importance(tp_group)
                if value is None or value.numel() != group.size:
                    raise RuntimeError(f"Torch-Pruning's {type(importance).__name__} gave no scores for {name}")
                scores[name] = value.detach().double().cpu()
        finally:
            for p, g in grads.items():
                p.grad = g
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
        return scores


class TPGroupMagnitude(TorchPruningImportance):
    """``tp.importance.GroupMagnitudeImportance()`` (weights only)."""

    name = "tp_group_magnitude"
    needs_data = False

    @staticmethod
    def make() -> tp.importance.Importance:
        return tp.importance.GroupMagnitudeImportance()


class TPGroupTaylor(TorchPruningImportance):
    """``tp.importance.GroupTaylorImportance()`` (first order, from weight gradients)."""

    name = "tp_group_taylor"
    needs_data = True

    @staticmethod
    def make() -> tp.importance.Importance:
        return tp.importance.GroupTaylorImportance()


class FixedGroupHessian(tp.importance.GroupHessianImportance):
    """``GroupHessianImportance`` with the accumulation keyed consistently (a sum over samples)."""

    def accumulate_grad(self, model: torch.nn.Module) -> None:
        for param in model.parameters():
            if param.grad is not None:
                self._accu_grad[param] = self._accu_grad.get(param, 0) + param.grad.detach().pow(2)
                self._counter[param] = self._counter.get(param, 0) + 1


def hessian_scores(importance: tp.importance.GroupHessianImportance, structure, x, y) -> dict[str, torch.Tensor]:
    """Per-sample squared gradients accumulated as Torch-Pruning's docs show, then scored per group."""
    model = structure.model
    importance.zero_grad()
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        importance.accumulate_grad(model)
    out = {}
    for name, group in structure.groups.items():
        module = model.get_submodule(group.producers[0])
        prune = structure.graph.get_pruner_of_module(module).prune_out_channels
        out[name] = importance(structure.graph.get_pruning_group(module, prune, list(range(group.size)))).clone()
    model.zero_grad(set_to_none=True)
    return out


def hessian_check(seeds: int, samples: int) -> dict[str, object]:
    """Spearman(shipped, fixed) per group and seed on a small CNN trained 3 epochs on digits."""
    import lightning as L

    from lightning_ifprune.data import DigitsDataModule
    from lightning_ifprune.models import build_model
    from lightning_ifprune.module import ImageClassifier

    rows = []
    for seed in range(seeds):
        L.seed_everything(seed, verbose=False)
        data = DigitsDataModule(seed=0, batch_size=64, image_size=16)
        net = build_model("small_cnn", num_classes=10, in_channels=1, widths=[16, 32, 64])
        module = ImageClassifier(net, 10, optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
        L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)  # fmt: skip
        net.eval()  # per-sample gradients: BatchNorm on running statistics
        x, y = next(iter(data.train_dataloader()))
        x, y = x[:samples], y[:samples]
        structure = lip.ChannelStructure.build(net, x[:1])
        shipped = hessian_scores(tp.importance.GroupHessianImportance(), structure, x, y)
        fixed = hessian_scores(FixedGroupHessian(), structure, x, y)
        for name in structure.groups:
            rho = float(stats.spearmanr(shipped[name].numpy(), fixed[name].numpy()).statistic)
            rows.append({"seed": seed, "group": name, "spearman": rho})
    values = [r["spearman"] for r in rows]
    return {"samples": samples, "rows": rows, "min": min(values), "max": max(values)}


def main() -> None:
    """Print and save the GroupHessianImportance accumulation check."""
    parser = argparse.ArgumentParser(description="Torch-Pruning GroupHessianImportance accumulation check")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tp_hessian.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = hessian_check(args.seeds, args.samples)
    for r in result["rows"]:
        print(f"seed {r['seed']}  {r['group']:12s}  Spearman(shipped, fixed) {r['spearman']:+.3f}")
    print(f"range {result['min']:+.3f} .. {result['max']:+.3f} over {args.samples} samples")
    args.out.write_text(json.dumps({"command": "python benchmarks/peers.py", **result}, indent=1))


if __name__ == "__main__":
    main()
