"""Two-process CPU DDP run (gloo) for the callback test; not collected by pytest.

Usage: python tests/_ddp_run.py OUT.json [--no-rewrap]. Ranks see different data shards;
after every round and at every epoch end the ranks' parameter checksums and shapes are
gathered and compared; rank 0 writes the verdict to OUT.json. DDP runs with
``find_unused_parameters`` so that a missing re-wrap does not crash but diverges silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from _lit import classifier, loader  # noqa: E402

import lightning_ifprune as lip  # noqa: E402


class RankCheck(Callback):
    """Gathers a checksum of every parameter from every rank and compares them."""

    def __init__(self) -> None:
        self.results: list[bool] = []

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flat = torch.cat([p.detach().double().flatten() for p in pl_module.parameters()])
        sig = torch.stack(
            [
                flat.sum(),
                (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum(),
                torch.tensor(float(flat.numel()), dtype=torch.float64),
            ]
        )
        gathered = trainer.strategy.all_gather(sig)
        self.results.append(bool(torch.equal(gathered[0], gathered[1])))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)


def main() -> None:
    out, rewrap = Path(sys.argv[1]), "--no-rewrap" not in sys.argv
    if not rewrap:  # what a pruner that forgets the re-wrap would do
        lip.callback.rewrap_ddp = lambda trainer: None
    L.seed_everything(0)
    module = classifier()
    pruner = lip.InfluencePruningCallback(
        target_flops=0.5,
        start_epoch=1,
        rounds=2,
        criterion=lip.Influence(num_probes=4, cg_iters=4),
        example_input=torch.zeros(1, 1, 8, 8),
    )
    check = RankCheck()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[pruner, check],
    )
    trainer.fit(module, loader(512))
    if trainer.global_rank == 0:
        history = lip.checkpoint.pruning_state(module)["history"]
        out.write_text(
            json.dumps(
                {
                    "rounds": len(history),
                    "checks": len(check.results),
                    "identical": all(check.results),
                    "per_check": check.results,
                }
            )
        )


if __name__ == "__main__":
    main()
