"""Cost of the pruning rounds inside ``fit``, in epochs of training compute.

ResNet-32 on CIFAR-shaped synthetic data (3×32×32, 10 classes, batch 128) is pruned to
50 % of its FLOPs by ``InfluencePruningCallback`` with its default schedule (one round,
2 batches) after one dense epoch, with the default influence estimator or the options given
with ``--estimator`` (JSON, e.g. '{"score": "paper", "probes": "ones"}'). The wall time of the rounds is
divided by the time of one CIFAR-10 training epoch (391 steps of batch 128), estimated from
the median time of the training steps measured in the same run on the dense model. The
reference spends about 57 epochs of training compute in its pruning phase (spec §3).

Run: ``python benchmarks/prune_cost.py [--model resnet32] [--device cpu|cuda] [--estimator JSON] [--quick]``.
Prints a table and writes ``benchmarks/results/prune_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ifprune import Influence, InfluencePruningCallback
from lightning_ifprune.data import SyntheticDataModule
from lightning_ifprune.measure import count_macs
from lightning_ifprune.models import build_model
from lightning_ifprune.module import ImageClassifier

CIFAR_STEPS_PER_EPOCH = 391  # 50,000 images / batch 128


class StepTimer(Callback):
    """Wall time of every training step (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def run(model_name: str, device: str, steps: int, batch: int, estimator: dict) -> dict:
    L.seed_everything(0)
    data = SyntheticDataModule(
        input_shape=(3, 32, 32),
        num_classes=10,
        num_samples=steps * batch,
        num_eval_samples=batch,
        batch_size=batch,
    )
    net = build_model(model_name, num_classes=10, in_channels=3)
    example = torch.zeros(1, 3, 32, 32)
    dense = count_macs(net, example)
    module = ImageClassifier(net, 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4))
    pruner = InfluencePruningCallback(
        target_flops=0.5,
        start_epoch=1,
        example_input=example,
        criterion=Influence(**estimator),
        verbose=False,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruner, timer],
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    dense_steps = timer.times[1:steps]  # epoch 0 is dense; its first step warms up
    step_s = statistics.median(dense_steps)
    epoch_s = step_s * CIFAR_STEPS_PER_EPOCH
    rounds_s = sum(pruner.round_times)
    return {
        "model": model_name,
        "batch": batch,
        "device": device,
        "estimator": estimator or "default",
        "flops_kept": count_macs(module.net.cpu(), example) / dense,
        "train_step_s": step_s,
        "cifar_epoch_s": epoch_s,
        "round_s": pruner.round_times,
        "rounds_total_s": rounds_s,
        "rounds_in_epochs": rounds_s / epoch_s,
        "reference_epochs": 57,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=6, help="training steps per epoch in this run")
    parser.add_argument("--estimator", default="{}", help="estimator options as JSON (default: defaults)")
    parser.add_argument("--quick", action="store_true", help="3 steps per epoch")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune_cost.json"))
    args = parser.parse_args()
    result = run(args.model, args.device, 3 if args.quick else args.steps, 128, json.loads(args.estimator))
    result.update(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        device_name=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
    )
    print(f"estimator: {result['estimator']}")
    print(
        f"{'model':10} {'step s':>8} {'epoch s (391 steps)':>20} {'rounds s':>9} {'rounds / epoch':>15} {'FLOPs kept':>11}"
    )
    print(
        f"{result['model']:10} {result['train_step_s']:8.3f} {result['cifar_epoch_s']:20.1f} "
        f"{result['rounds_total_s']:9.1f} {result['rounds_in_epochs']:15.3f} {result['flops_kept']:11.3f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
