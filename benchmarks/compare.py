"""Paired multi-seed comparison of pruning criteria end to end (spec §12).

Per (dataset, seed) one small CNN is pre-trained (``lightning.seed_everything(seed)`` sets the
init and the data order; the data split is fixed) and shared by every criterion. Each
criterion then prunes a deep copy to a FLOPs target inside a short fine-tune ``Trainer.fit``
(rounds at the start of epochs 0 and 1, or the reference's progressive schedule, which runs
until the target is met and then ``ft_epochs - 1`` more epochs), with the
same seed re-set so every criterion sees the same batches. The test accuracy is taken right
after the last pruning step and at the end of the fine-tune. Differences to the best
criterion of each (dataset, target) are paired per seed, with a 95 % t confidence interval.

Run ``python benchmarks/compare.py [--seeds 5] [--datasets digits,fashion_mnist] [--quick]``;
results go to ``benchmarks/results/compare.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

import lightning_ifprune as lip
from lightning_ifprune.data import DigitsDataModule, FashionMNISTDataModule
from lightning_ifprune.models import build_model
from lightning_ifprune.module import ImageClassifier
from lightning_ifprune.selection import kept_fraction

sys.path.insert(0, str(Path(__file__).parent))
from paired import mean_ci  # noqa: E402
from peers import TPGroupMagnitude, TPGroupTaylor  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.5, 0.3)
WEIGHT_DECAY = 5e-4
PROGRESSIVE_MAX_EPOCHS = 15

#: Per dataset: data module options, model widths, pre-train epochs / LR, fine-tune epochs / LR.
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": dict(data=dict(batch_size=64, image_size=16), widths=[16, 32, 64], pre_epochs=10, pre_lr=0.05,
                   ft_epochs=3, ft_lr=0.01),
    "fashion_mnist": dict(data=dict(batch_size=64, train_subset=6000, val_fraction=0.1), widths=[16, 32, 64],
                          pre_epochs=6, pre_lr=0.05, ft_epochs=3, ft_lr=0.01),
}  # fmt: skip
QUICK = {"digits": dict(pre_epochs=2, ft_epochs=2), "fashion_mnist": dict(pre_epochs=1, ft_epochs=2)}
QUICK_DATA = {"fashion_mnist": dict(train_subset=2000)}


def criteria(progressive: bool) -> dict[str, tuple[lip.Criterion, dict[str, Any]]]:
    """Row name → (criterion, schedule keyword arguments of the callback)."""
    rounds = dict(start_epoch=0, end_epoch=1, rounds=2)
    rows: dict[str, tuple[lip.Criterion, dict[str, Any]]] = {
        "influence": (lip.Influence(), rounds),  # the default: the paper's estimator
        "influence_cg": (lip.Influence(inverse="cg", micro_batches=2), rounds),  # the default before this run
        "fisher": (lip.Fisher(), rounds),
        "taylor": (lip.Taylor(), rounds),
        "magnitude": (lip.Magnitude(), rounds),
        "magnitude_per_group": (lip.Magnitude(per_group=True), rounds),
        "tp_group_magnitude": (TPGroupMagnitude(), rounds),
        "tp_group_taylor": (TPGroupTaylor(), rounds),
        "random": (lip.Random(), rounds),
        "loss_drop": (lip.LossDrop(), rounds),
    }
    if progressive:
        rows["influence_paper_progressive"] = (
            lip.Influence(),
            dict(start_epoch=0, rounds=1, every_n_steps=2, channels_per_step=1),
        )
    return rows


@torch.no_grad()
def test_accuracy(net: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    """Top-1 accuracy of ``net`` on ``loader`` (eval mode; the previous mode is restored)."""
    was_training = net.training
    net.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((net(x).argmax(1) == y).sum())
        total += len(y)
    net.train(was_training)
    return correct / total


class AfterPruning(Callback):
    """Records the test accuracy and kept FLOPs once, as soon as ``pruner`` has finished.

    Placed after the pruner, so its hooks see the model right after the last round (epoch
    start) or the last progressive step (batch start), before any further training.
    """

    def __init__(
        self, pruner: lip.InfluencePruningCallback, loader: torch.utils.data.DataLoader, ft_after: int | None = None
    ) -> None:
        self.pruner, self.loader, self.ft_after = pruner, loader, ft_after
        self.acc: float | None = None
        self.epoch: int | None = None
        self.flops: float | None = None
        self.step: int | None = None

    def _check(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        if self.acc is not None or not self.pruner.finished:
            return
        self.acc = test_accuracy(pl_module.net, self.loader)
        self.flops = kept_flops(self.pruner, pl_module)
        self.step, self.epoch = trainer.global_step, trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        """With ``ft_after``: stop that many full epochs after the epoch in which pruning finished."""
        if self.ft_after is not None and self.epoch is not None and trainer.current_epoch >= self.epoch + self.ft_after:
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:
        self._check(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: ImageClassifier, batch: Any, batch_idx: int) -> None:
        self._check(trainer, pl_module)


def kept_flops(pruner: lip.InfluencePruningCallback, pl_module: ImageClassifier) -> float:
    """Fraction of the original FLOPs the module keeps now."""
    structure = lip.ChannelStructure.build(pl_module, pruner.example_input)
    return kept_fraction(structure, "flops", pruner.baseline)


def trainer(epochs: int, callbacks: list[Callback] | None = None) -> L.Trainer:
    """A quiet single-process CPU trainer without validation."""
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks or [], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip


def sgd(lr: float) -> functools.partial:
    """The SGD factory shared by pre-training and fine-tuning."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY)


def make_data(name: str, options: dict[str, Any]) -> L.LightningDataModule:
    """The data module (split seed fixed at 0: the seed varies init and data order only)."""
    cls = DigitsDataModule if name == "digits" else FashionMNISTDataModule
    data = cls(seed=0, **options)
    data.prepare_data()
    data.setup("fit")
    return data


def run_seed(name: str, cfg: dict[str, Any], seed: int, rows: dict[str, Any]) -> dict[str, Any]:
    """Pre-train once for ``seed``, then prune + fine-tune a copy per (target, criterion)."""
    data = make_data(name, cfg["data"])
    test_loader = data.test_dataloader()
    L.seed_everything(seed, verbose=False)
    net = build_model("small_cnn", num_classes=10, in_channels=1, widths=cfg["widths"])
    sched = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=cfg["pre_epochs"])
    base = ImageClassifier(net, 10, optimizer=sgd(cfg["pre_lr"]), scheduler=sched)
    t0 = time.perf_counter()
    trainer(cfg["pre_epochs"]).fit(base, datamodule=data)
    out: dict[str, Any] = {"pretrain_s": time.perf_counter() - t0, "acc_base": test_accuracy(base.net, test_loader)}
    log(f"[{name} seed {seed}] pre-trained: acc {out['acc_base']:.4f} ({out['pretrain_s']:.1f}s)")
    state = copy.deepcopy(base.net.state_dict())
    for target in TARGETS:
        for row, (criterion, schedule) in rows.items():
            L.seed_everything(seed, verbose=False)  # same batches for every criterion; Random follows it
            net = build_model("small_cnn", num_classes=10, in_channels=1, widths=cfg["widths"])
            net.load_state_dict(state)
            module = ImageClassifier(net, 10, optimizer=sgd(cfg["ft_lr"]))
            pruner = lip.InfluencePruningCallback(
                target_flops=target, criterion=copy.deepcopy(criterion), num_batches=2, verbose=False, **schedule
            )
            progressive = "every_n_steps" in schedule  # runs until the target is met, then ft_epochs - 1 more
            probe = AfterPruning(pruner, test_loader, cfg["ft_epochs"] - 1 if progressive else None)
            t0 = time.perf_counter()
            trainer(PROGRESSIVE_MAX_EPOCHS if progressive else cfg["ft_epochs"], [pruner, probe]).fit(
                module, datamodule=data
            )
            rec = {
                "acc_pruned": probe.acc, "acc_ft": test_accuracy(module.net, test_loader),
                "flops_kept": probe.flops if probe.flops is not None else kept_flops(pruner, module),
                "finished": pruner.finished, "pruned_at_step": probe.step, "steps": module.trainer.global_step,
                "epochs": module.trainer.current_epoch,
                "rounds": len(pruner.round_times), "score_s": float(sum(pruner.round_times)),
                "fit_s": time.perf_counter() - t0,
            }  # fmt: skip
            out[f"{target}/{row}"] = rec
            log(f"[{name} seed {seed}] t={target} {row:28s} prune {fmt(rec['acc_pruned'])} ft {rec['acc_ft']:.4f} "
                f"flops {rec['flops_kept']:.3f} score {rec['score_s']:.2f}s fit {rec['fit_s']:.1f}s")  # fmt: skip
    return out


def fmt(x: float | None) -> str:
    """An accuracy, or n/a."""
    return "n/a" if x is None else f"{x:.4f}"


def log(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


def summarize(raw: dict[str, dict[int, dict[str, Any]]], rows: list[str]) -> list[dict[str, Any]]:
    """Per (dataset, target, criterion): means, stds and paired differences to the best."""
    table: list[dict[str, Any]] = []
    for name, seeds in raw.items():
        for target in TARGETS:
            recs = {r: [seeds[s][f"{target}/{r}"] for s in sorted(seeds)] for r in rows}
            valid = [r for r in rows if all(x["finished"] and x["acc_pruned"] is not None for x in recs[r])]
            ft = {r: [x["acc_ft"] for x in recs[r]] for r in rows}
            best = max(valid or rows, key=lambda r: np.mean(ft[r]))
            for r in rows:
                pruned = [x["acc_pruned"] if x["acc_pruned"] is not None else math.nan for x in recs[r]]
                entry: dict[str, Any] = dict(dataset=name, target=target, criterion=r, best=best, n=len(ft[r]),
                                             comparable=r in valid)  # fmt: skip
                for key, vals in (("pruned", pruned), ("ft", ft[r])):
                    entry[f"acc_{key}_mean"], entry[f"acc_{key}_std"], entry[f"acc_{key}_ci"] = mean_ci(vals)
                for key, vals, ref in (("pruned", pruned, [x["acc_pruned"] or math.nan for x in recs[best]]),
                                       ("ft", ft[r], ft[best])):  # fmt: skip
                    diff = [a - b for a, b in zip(vals, ref, strict=True)]
                    m, _, h = mean_ci(diff)
                    entry[f"delta_{key}"], entry[f"delta_{key}_ci"] = m, h
                    entry[f"significant_{key}"] = bool(r != best and not math.isnan(h) and abs(m) > h)
                entry["score_s_mean"] = float(np.mean([x["score_s"] for x in recs[r]]))
                entry["flops_kept_mean"] = float(np.mean([x["flops_kept"] for x in recs[r]]))
                table.append(entry)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| dataset | target | criterion | acc after prune | acc after FT | Δ vs best after FT [95 % CI] | significant? "
        "| scoring s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        pct = lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f}"  # noqa: E731
        if e["criterion"] == e["best"]:
            delta, sig = "best", "—"
        else:
            d, h = 100 * e["delta_ft"], 100 * e["delta_ft_ci"]
            delta, sig = f"{d:+.2f} [{d - h:+.2f}, {d + h:+.2f}]", "**yes**" if e["significant_ft"] else "no"
        name = e["criterion"] + ("" if e["comparable"] else " (target not reached)")
        lines.append(f"| {e['dataset']} | {e['target']} | {name} | {pct(e['acc_pruned_mean'], e['acc_pruned_std'])} "
                     f"| {pct(e['acc_ft_mean'], e['acc_ft_std'])} | {delta} | {sig} | {e['score_s_mean']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Accuracy after fine-tune per criterion with 95 % CI bars, one panel per dataset × target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(e["dataset"], e["target"]) for e in table}, key=lambda p: (p[0], -p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, target) in zip(axes[0], panels, strict=True):
        rows = [e for e in table if e["dataset"] == name and e["target"] == target]
        y = np.arange(len(rows))
        means = [100 * e["acc_ft_mean"] for e in rows]
        cis = [100 * np.nan_to_num(e["acc_ft_ci"]) for e in rows]
        colors = ["tab:green" if e["criterion"] == e["best"] else "tab:red" if e["significant_ft"] else "tab:blue"
                  for e in rows]  # fmt: skip
        ax.errorbar(means, y, xerr=cis, fmt="none", ecolor="gray", capsize=3)
        ax.scatter(means, y, c=colors, zorder=3)
        ax.set_yticks(y, [e["criterion"] for e in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{name}, FLOPs {target}", fontsize=10)
        ax.set_xlabel("test acc after fine-tune (%), 95 % CI")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("green: best, red: paired difference to best significant", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Parse the CLI, run every (dataset, seed), summarise and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--datasets", default="digits,fashion_mnist")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, tiny epochs and subset")
    parser.add_argument("--no-progressive", action="store_true", help="skip the progressive-schedule row")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|TPU available).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = list(range(2 if args.quick else args.seeds))
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    settings = {n: copy.deepcopy(SETTINGS[n]) for n in names}
    if args.quick:
        for n in names:
            settings[n].update(QUICK[n])
            settings[n]["data"].update(QUICK_DATA.get(n, {}))
    rows = criteria(progressive=not args.no_progressive)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    raw: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    for n in names:
        for seed in seeds:
            raw[n][seed] = run_seed(n, settings[n], seed, rows)
            done = {k: v for k, v in raw.items() if v}
            partial = {"meta": {"partial": True, "wall_s": time.perf_counter() - start}, "raw": done}
            (args.out / "compare.json").write_text(json.dumps(partial, indent=1))
    wall = time.perf_counter() - start
    table = summarize(raw, list(rows))
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(table)
    print(md)
    print(f"total wall time {wall:.0f}s")
    meta = {
        "command": command.strip(), "seeds": seeds, "targets": list(TARGETS), "settings": settings,
        "criteria": {r: {"criterion": repr(c), "schedule": s} for r, (c, s) in rows.items()},
        "num_batches": 2, "weight_decay": WEIGHT_DECAY, "torch": torch.__version__, "lightning": L.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(), "wall_s": wall, "quick": args.quick,
    }  # fmt: skip
    (args.out / "compare.json").write_text(json.dumps({"meta": meta, "summary": table, "raw": raw}, indent=1))
    (args.out / "compare.md").write_text(f"```\n{meta['command']}\n```\n\n{md}\nTotal wall time {wall:.0f} s.\n")
    plot(table, args.out / "compare.png")


if __name__ == "__main__":
    main()
