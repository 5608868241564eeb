"""Plain Lightning (no Hydra): train a small CNN on the embedded digits data and prune it
to half its FLOPs with the influence criterion, inside the same ``fit``.

Run: ``python examples/prune_digits.py``
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch

from lightning_ifprune import Influence, InfluencePruningCallback, load_pruned_checkpoint
from lightning_ifprune.data import DigitsDataModule
from lightning_ifprune.measure import count_macs
from lightning_ifprune.models import build_model
from lightning_ifprune.module import ImageClassifier


def main() -> None:
    L.seed_everything(0)
    data = DigitsDataModule(image_size=16)
    net = build_model("small_cnn", num_classes=10, in_channels=1)
    model = ImageClassifier(
        net,
        num_classes=10,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    )
    dense = count_macs(net, torch.zeros(1, 1, 16, 16))
    # The default estimator (Influence() = Influence(EstimatorOptions())); its weight decay is
    # taken from the optimizer. Any option is a keyword: Influence(num_probes=8, cg_iters=5).
    pruner = InfluencePruningCallback(target_flops=0.5, start_epoch=3, end_epoch=5, rounds=3, criterion=Influence())
    trainer = L.Trainer(
        max_epochs=10,
        accelerator="cpu",
        callbacks=[pruner],
        logger=False,
        default_root_dir="outputs/example",
    )
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    pruned = count_macs(model.net, torch.zeros(1, 1, 16, 16))
    print(f"test accuracy {result['test/acc']:.4f}, FLOPs kept {pruned / dense:.3f}")

    # The pruned architecture travels in the checkpoint and is rebuilt on load.
    trainer.save_checkpoint("outputs/example/pruned.ckpt")
    again = load_pruned_checkpoint(
        ImageClassifier,
        "outputs/example/pruned.ckpt",
        net=build_model("small_cnn", num_classes=10, in_channels=1),
    )
    assert count_macs(again.net, torch.zeros(1, 1, 16, 16)) == pruned


if __name__ == "__main__":
    main()
