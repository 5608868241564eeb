"""Multi-input tracing and torchvision detectors: masks equal removal, pruning inside fit, checkpoints."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from _lit import cpu_trainer, widths
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import lightning_ifprune as lip
from lightning_ifprune.batch import batch_size, split_batch
from lightning_ifprune.data.shapes import ShapesDataset, ShapesDetectionDataModule, detection_collate, draw_sample
from lightning_ifprune.detector import DetectionModule
from lightning_ifprune.measure import count_macs
from lightning_ifprune.models.detection import build_detector
from lightning_ifprune.structure import channel_masks, validate_example_inputs
from lightning_ifprune.structure.detection import output_layers
from lightning_ifprune.surgery import prune_channels

SIZE = 64
SMALL = {
    "retinanet_resnet18_fpn": {"fpn_channels": 32},
    "fcos_resnet18_fpn": {"fpn_channels": 64},  # GroupNorm(32) needs 2 channels per group on the 1x1 P7
    "fasterrcnn_mobilenet_v3_fpn": {
        "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
        "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 32, "box_detections_per_img": 10,
    },
}  # fmt: skip


def detector(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(name, 4, min_size=SIZE, max_size=SIZE, **SMALL[name])


def random_plan(structure: lip.ChannelStructure, seed: int = 1) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(g.size, generator=gen)[: g.size // 2].tolist() for n, g in structure.groups.items()}


def head_outputs(model: nn.Module, images: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """What the output layers compute in an eval forward (every FPN level; tuples flattened)."""
    got: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        return lambda _m, _a, out: got.setdefault(name, []).extend(out if isinstance(out, tuple) else [out])

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in output_layers(model)]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    return got


class TwoInputs(nn.Module):
    """Image and auxiliary map through separate stems, summed, then a head: forward(x, aux, scale=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x) + self.b(aux)))
        return self.fc(torch.relu(self.mid(h)).mean((2, 3))) * scale


@pytest.mark.parametrize("form", ["args", "kwargs"])
def test_a_multi_input_forward_traces_and_masks_equal_removal(form: str) -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)
    example = (x, aux, 2.0) if form == "args" else {"x": x, "aux": aux, "scale": 2.0}
    structure = lip.ChannelStructure.build(model, example)
    assert set(structure.groups) == {"a", "mid"}  # the summed stems are one group
    plan = random_plan(structure)
    with channel_masks(structure) as masks, torch.no_grad():
        for name, idxs in plan.items():
            masks[name][idxs] = 0
        masked = model(x, aux, scale=2.0)
    removed = {n: len(v) for n, v in plan.items()}
    predicted = structure.cost(removed)[0]
    prune_channels(structure, plan)
    assert model.a.out_channels == model.b.out_channels == 4
    torch.testing.assert_close(model(x, aux, scale=2.0), masked, rtol=1e-5, atol=1e-6)
    assert predicted == count_macs(model, example)  # the cost model against FlopCounterMode


@pytest.mark.parametrize(
    ("example", "match"),
    [
        (torch.zeros(3), "batched tensor"),
        ([], "empty list"),
        ((), "empty tuple"),
        ({0: torch.zeros(1, 3)}, "string keys"),
        (("text", 3), "no tensor"),
        ("image.png", "got a str"),
        ((torch.tensor(1.0), torch.zeros(1, 3)), "scalar tensor"),
    ],
)
def test_bad_example_inputs_are_clear_errors_before_anything_changes(example, match: str, state_snapshot) -> None:
    model = TwoInputs()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        lip.ChannelStructure.build(model, example)
    with pytest.raises(ValueError, match=match):
        lip.InfluencePruningCallback(0.5, example_input=example)
    before.assert_unchanged()


def test_forms_of_example_inputs() -> None:
    x = torch.zeros(2, 3, 8, 8)
    assert validate_example_inputs((x,)) is x  # a one-tensor tuple is that tensor
    images = [torch.zeros(3, 8, 8)]
    assert validate_example_inputs(images) is images  # a list of samples stays one argument


@pytest.mark.parametrize("name", ["retinanet_resnet18_fpn", "fasterrcnn_mobilenet_v3_fpn", "fcos_resnet18_fpn"])
def test_detector_masks_equal_removal_and_output_layers_stay(name: str) -> None:
    """Silencing half of every group's channels gives the outputs of the detector with those
    channels removed (eval mode, every output layer on every FPN level); the output layers
    keep their output channels and are named in ``skipped``."""
    model = detector(name).eval()
    images = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))]
    structure = lip.ChannelStructure.build(model, images)
    outputs = output_layers(model)
    assert outputs and all(any(s == o or s.startswith(o + ".") for o in outputs) for s in structure.skipped
                           if "output layer" in structure.skipped[s])  # fmt: skip
    assert sum("output layer" in why for why in structure.skipped.values()) >= 2
    assert any(n.startswith("backbone.fpn") for n in structure.groups)
    heads = {n: tuple(p.shape[:1]) for n, p in model.named_parameters() if any(n.startswith(o) for o in outputs)}
    plan = random_plan(structure)
    with channel_masks(structure) as masks:
        for group, idxs in plan.items():
            masks[group][idxs] = 0
        masked = head_outputs(model, images)
    prune_channels(structure, plan)
    pruned = head_outputs(model, images)
    assert {n: tuple(p.shape[:1]) for n, p in model.named_parameters() if n in heads} == heads
    for layer, tensors in masked.items():
        for a, b in zip(tensors, pruned[layer], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))


def test_roi_align_is_twice_differentiable_while_estimating() -> None:
    """Inside ``estimation_mode`` torchvision's RoI pooler gives the same values and gradients as
    its C++ kernel (which has no double backward), has a second derivative, and is restored."""
    from torchvision.ops import MultiScaleRoIAlign, poolers

    torch.manual_seed(0)
    pool = nn.ModuleDict(
        {"conv": nn.Conv2d(4, 4, 1), "pool": MultiScaleRoIAlign(["0"], output_size=3, sampling_ratio=2)}
    )
    features = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0], [0.0, 0.0, 15.0, 15.0]], dtype=torch.float64)] * 2
    weights = torch.randn(4, 4, 3, 3, dtype=torch.float64)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        out = pool["pool"]({"0": features}, boxes, [(64, 64)] * 2)
        (grad,) = torch.autograd.grad((out * weights).square().sum(), features, create_graph=True)
        return out, grad

    original = poolers.roi_align
    reference, ref_grad = run()
    with pytest.raises(RuntimeError, match="double backward|derivative for"):
        torch.autograd.grad(ref_grad.sum(), features)
    with lip.estimator.estimation_mode(pool):
        out, grad = run()
        (second,) = torch.autograd.grad(grad.square().sum(), features)
    assert poolers.roi_align is original
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, ref_grad)
    assert second.abs().sum() > 0


def test_influence_scores_faster_rcnn(state_snapshot) -> None:
    """Faster R-CNN (RoI align in its box head) is scored by influence: finite scores for every
    group, the model untouched."""
    model = detector("fasterrcnn_mobilenet_v3_fpn").train()
    images, targets = detection_collate([ShapesDataset(2, 0, size=SIZE)[i] for i in range(2)])

    def loss(net: nn.Module, batch) -> torch.Tensor:
        return sum(net(*batch).values())

    before = state_snapshot(model)
    structure = lip.ChannelStructure.build(model, [images[0]])
    scores = lip.score_channels(model, [(images, targets)], loss=loss, criterion="influence")
    before.assert_unchanged()
    assert set(scores) == set(structure.groups)
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert any(s.abs().sum() > 0 for s in scores.values())


def test_an_op_without_second_derivatives_is_a_clear_error(state_snapshot) -> None:
    """torchvision's RoI pooling kernel has no double backward: influence says so, changes nothing."""
    from torchvision.ops import roi_pool

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]]).expand(len(x), 4)
            return roi_pool(self.b(self.a(x)), list(boxes.unsqueeze(1)), 1).flatten(1)

    model = Net()
    x, y = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 0, 1])
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="second derivatives.*Net has none"):
        lip.score_channels(model, [(x, y)], loss_fn=nn.functional.cross_entropy, criterion="influence")
    before.assert_unchanged()


def test_shapes_data_is_deterministic_and_batches_are_lists() -> None:
    image, target = draw_sample(7)
    again, same = draw_sample(7)
    assert torch.equal(image, again) and torch.equal(target["boxes"], same["boxes"])
    assert not torch.equal(image, draw_sample(8)[0])
    boxes = target["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 128
    assert set(target["labels"].tolist()) <= {1, 2, 3}
    dm = ShapesDetectionDataModule(num_train=6, num_eval=2, image_size=32, batch_size=3)
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 3 and images[0].shape == (3, 32, 32)
    assert batch_size((images, targets)) == 3  # not the images' channel count
    parts = split_batch((images + images[:1], targets + targets[:1]), 2)
    assert [len(p[0]) for p in parts] == [len(p[1]) for p in parts] == [2, 2]


def test_training_step_is_the_sum_of_the_loss_dict() -> None:
    model = detector("retinanet_resnet18_fpn").train()
    module = DetectionModule(model, 4)
    images, targets = detection_collate([ShapesDataset(2, 0, size=SIZE)[i] for i in range(2)])
    expected = sum(model(images, targets).values())
    module.log = module.log_dict = lambda *a, **k: None  # outside a Trainer
    torch.testing.assert_close(module.training_step((images, targets), 0), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "criterion"), [("retinanet_resnet18_fpn", "influence"), ("fasterrcnn_mobilenet_v3_fpn", "fisher")]
)
def test_a_detector_prunes_in_fit_trains_infers_and_loads(tmp_path: Path, name: str, criterion: str) -> None:
    """Inside fit, to ≤ 60 % of its FLOPs in two rounds, traced with the first image of the first
    batch; then it trains (loss dict, backward), infers in eval mode, and its checkpoint loads
    into a fresh module with the pruned architecture and the same detections."""
    L.seed_everything(0)
    module = DetectionModule(detector(name), 4, optimizer=partial(torch.optim.SGD, lr=0.005, momentum=0.9))
    data = ShapesDataset(16, 0, size=SIZE)
    loader = DataLoader(data, batch_size=4, collate_fn=detection_collate)
    images, targets = detection_collate([data[i] for i in range(4)])
    dense = count_macs(module, images[:1])
    pruner = lip.InfluencePruningCallback(target_flops=0.6, rounds=2, criterion=criterion, verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    cpu_trainer(tmp_path, 3, [pruner, saver]).fit(module, loader)
    assert pruner.finished and count_macs(module, images[:1]) <= 0.6 * dense
    assert len(pruner.example_input) == 1 and torch.equal(pruner.example_input[0], images[0])

    module.train()
    losses = module.net(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in module.net.backbone.parameters())
    module.eval()
    with torch.no_grad():
        detections = module(images)
    assert len(detections) == 4 and all(d["boxes"].shape[1:] == (4,) for d in detections)

    fresh = lip.load_pruned_checkpoint(DetectionModule, tmp_path / "last.ckpt", net=detector(name, seed=1))
    assert widths(fresh) == widths(module)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    module.load_state_dict(saved)
    with torch.no_grad():
        for a, b in zip(fresh.eval()(images), module(images), strict=True):
            torch.testing.assert_close(a["boxes"], b["boxes"])


@pytest.mark.slow
@pytest.mark.usefixtures("keep_torch_threads")
def test_the_detection_experiment_reports_map_flops_and_latency(tmp_path: Path, compose_cfg) -> None:
    """``experiment=detection_shapes``, shrunk: pre-train, prune to half the FLOPs in two rounds,
    fine-tune; summary.json reports mAP before/after (measured again here), FLOPs and latency."""
    import json

    from lightning_ifprune.app import train
    from lightning_ifprune.app.phases import load_initial_weights
    from lightning_ifprune.measure import evaluate_map

    cfg = compose_cfg(
        tmp_path, "experiment=detection_shapes", "prune=fisher", "data.num_train=16", "data.num_eval=8",
        "data.image_size=64", "data.batch_size=4", "pretrain.epochs=1", "pretrain.save_checkpoint=true",
        "trainer.max_epochs=2", "prune.rounds=2", "prune.end_epoch=1", "report.latency_iters=1",
        "report.latency_batch_size=2", "+trainer.enable_progress_bar=false",
    )  # fmt: skip
    summary = train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["metric"] == "map" and summary["test_acc_before"] is None
    assert summary["target_met"] and summary["flops_after"] <= 0.5 * summary["flops_before"]
    assert set(summary["test_metrics_after"]) == {"test/map", "test/map_50"}
    assert summary["latency_before_ms"] > 0 and summary["latency_after_ms"] > 0
    assert summary["channels_after"] and summary["channels_after"] != summary["channels_before"]
    # The reported mAP before pruning is that of the pre-trained checkpoint, measured apart.
    module = DetectionModule(build_detector("fcos_mobilenet_v3_small_fpn", 4, min_size=64, max_size=64), 4)
    load_initial_weights(module, tmp_path / "pretrained.ckpt")
    dm = ShapesDetectionDataModule(num_train=16, num_eval=8, image_size=64, batch_size=4, seed=0)
    dm.setup()
    assert evaluate_map(module, dm.test_dataloader()) == pytest.approx(summary["test_before"], abs=1e-6)
