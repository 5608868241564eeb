"""The measured latency cost model, latency targets and ``round_to`` (no timing: a fake timer)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _lit import classifier, cpu_trainer, loader
from torch import nn

import lightning_ifprune as lip
import lightning_ifprune.app
from lightning_ifprune import latency as lat
from lightning_ifprune import latency_env
from lightning_ifprune.latency import LatencyModel, LayerGrid, grid_axis
from lightning_ifprune.latency_env import LatencyEnv
from lightning_ifprune.models import build_model, resnet20
from lightning_ifprune.selection import baseline_of, parse_target, resolve_round_to, resource_size, select_channels
from lightning_ifprune.structure import ChannelStructure
from lightning_ifprune.surgery import prune_channels

ENV = LatencyEnv("cpu:test", 1, torch.__version__)


class FakeTimer:
    """A deterministic stand-in for the timer: 'seconds' from a layer's work; the whole model is
    its Conv/Linear work plus ``ELEMENTWISE`` × its BatchNorms' work (what no layer explains runs
    on the normalised tensors) plus ``CONSTANT``; calls counted."""

    ELEMENTWISE = 3.0
    CONSTANT = 0.0

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        self.calls.append(type(module).__name__)
        layer = isinstance(module, (nn.Conv2d, nn.Linear)) or (
            isinstance(module, nn.Sequential) and isinstance(module[0], nn.modules.batchnorm._BatchNorm)
        )
        if layer:
            with torch.no_grad():
                return self.work(module, (x,), module(x))
        weighted, norms = [], []

        def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
            (norms if isinstance(m, nn.BatchNorm2d) else weighted).append(self.work(m, i, o))

        parts = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
        hooks = [m.register_forward_hook(hook) for m in parts]
        with torch.no_grad():
            module(x)
        for h in hooks:
            h.remove()
        return sum(weighted) + self.ELEMENTWISE * sum(norms) + self.CONSTANT

    @staticmethod
    def work(module: nn.Module, inputs: tuple, y: torch.Tensor) -> float:
        x = inputs[0]
        positions = max(y[0].numel() // y.shape[1], 1)
        return 1e-9 * sum(p.numel() for p in module.parameters()) * x.shape[0] * positions + 1e-8 * (
            x.numel() + y.numel()
        )


def cnn(widths: tuple[int, ...] = (16, 32, 32)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, widths=widths).eval(), torch.zeros(1, 1, 8, 8)


def latency_model(model: nn.Module, example: torch.Tensor, tmp_path: Path, **kwargs) -> LatencyModel:
    structure = ChannelStructure.build(model, example)
    options = {
        "cache_dir": tmp_path,
        "env": ENV,
        "measure": FakeTimer(),
        "progress": False,
        "batch_size": 8,
        "block": 1,
    }
    return LatencyModel.build(structure, **{**options, **kwargs})


def layer_calls(timer: FakeTimer, model: nn.Module) -> int:
    return sum(name != type(model).__name__ for name in timer.calls)


def test_cache_is_keyed_by_environment_and_layer_signature(tmp_path: Path) -> None:
    model, example = cnn()
    structure = ChannelStructure.build(model, example)

    def build(env: LatencyEnv = ENV, batch_size: int = 8) -> FakeTimer:
        timer = FakeTimer()
        LatencyModel.build(structure, batch_size, cache_dir=tmp_path, measure=timer, env=env, progress=False)
        return timer

    first = build()
    assert layer_calls(first, model) > 0 and first.calls.count(type(model).__name__) == 1
    assert layer_calls(build(), model) == 0  # everything from the cache; only the whole model is timed
    saved = json.loads((tmp_path / f"{ENV.key()}.json").read_text())
    assert saved["env"]["device"] == "cpu:test" and len(saved["points"]) == layer_calls(first, model)
    for other in (
        LatencyEnv("cpu:test", 2, torch.__version__),
        LatencyEnv("cuda:Other GPU", 1, torch.__version__),
        LatencyEnv("cpu:test", 1, "0.0"),
        LatencyEnv("cpu:test", 1, torch.__version__, "libjemalloc.so"),
    ):
        assert layer_calls(build(other), model) == layer_calls(first, model), other
    assert layer_calls(build(batch_size=4), model) == layer_calls(first, model)  # batch size is in the signature


def test_current_environment_follows_the_thread_count(keep_torch_threads) -> None:
    torch.set_num_threads(1)
    one = LatencyEnv.current(torch.device("cpu"))
    torch.set_num_threads(2)
    two = LatencyEnv.current(torch.device("cpu"))
    assert (one.threads, two.threads) == (1, 2) and one.key() != two.key()


def test_grid_interpolates_bilinearly_and_clamps() -> None:
    grid = LayerGrid("sig", [1, 3], [2, 4], [[1.0, 3.0], [5.0, 7.0]])
    assert grid(1, 2) == 1.0 and grid(3, 4) == 7.0
    assert grid(2, 3) == pytest.approx(4.0)
    assert grid(0, 9) == 3.0 and grid(5, 1) == 5.0
    assert grid_axis(16, True) == [1, 5, 8, 12, 16] and grid_axis(3, False) == [3]
    assert all(w % 4 == 0 for w in grid_axis(32, True, multiple=4) if w > 4)


def test_block_aligned_grids_price_a_width_as_the_next_multiple(tmp_path: Path) -> None:
    """With a channel block, convolution grids are measured at its multiples (and the full
    width), and a width between two multiples costs what the next one costs."""
    assert grid_axis(40, True, multiple=16) == [1, 8, 16, 32, 40] and grid_axis(12, True, multiple=16) == [1, 8, 12]
    grid = LayerGrid("sig", [3], [1, 8, 16, 32, 48], [[0.25, 0.5, 1.0, 2.0, 4.0]], block=16)
    assert grid(3, 17) == grid(3, 32) == 2.0 and grid(3, 33) == grid(3, 40) == 4.0
    assert grid(3, 8) == 0.5 and grid(3, 12) == pytest.approx(0.75)  # within the first block: interpolated
    model, example = cnn((16, 32, 48))
    lm = latency_model(model, example, tmp_path, block=16)
    conv = lm.layers["features.8"]  # 32 -> 48 channels
    assert conv.block == 16 and conv.ins == [1, 8, 16, 32] and conv.outs == [1, 8, 16, 32, 48]
    assert conv(32, 33) == conv(32, 47) == conv(32, 48) > conv(32, 32) and conv(17, 48) == conv(32, 48)
    assert lm.layers["features.9"].block == 1 and lm.layers["classifier"].block == 1  # BN, Linear: no blocks
    assert lm.block == 16 and latency_model(model, example, tmp_path / "1").block == 1


def test_auto_round_to_is_the_block_for_latency_targets_only(tmp_path: Path) -> None:
    model, example = cnn((16, 32, 48))
    structure = ChannelStructure.build(model, example)
    lm = latency_model(model, example, tmp_path, block=16)
    assert resolve_round_to("auto", "latency", lm) == 16
    assert resolve_round_to("auto", "flops", lm) is None and resolve_round_to("auto", "latency", None) is None
    assert resolve_round_to(None, "latency", lm) is None and resolve_round_to(4, "flops", lm) == 4
    torch.manual_seed(0)
    scores = {n: torch.rand(g.size) for n, g in structure.groups.items()}
    plan = select_channels(structure, scores, "latency", 0.6, latency=lm, round_to="auto")
    assert plan and all((structure.groups[n].size - len(v)) % 16 == 0 for n, v in plan.items())
    flops_plan = select_channels(structure, scores, "flops", 0.6, latency=lm, round_to="auto")
    assert any((structure.groups[n].size - len(v)) % 16 for n, v in flops_plan.items())
    assert latency_env.channel_block(torch.device("cpu")) == latency_env.CPU_BLOCKS.get(
        torch.backends.cpu.get_cpu_capability(), 1
    )
    assert torch.backends.cpu.get_cpu_capability() in latency_env.device_name(torch.device("cpu"))


def test_auto_round_to_halves_the_block_until_the_target_is_reachable(tmp_path: Path) -> None:
    """Groups of one block (ResNet-56's 16-channel stage at a block of 16) cannot shrink at all
    when rounded to the block: "auto" then rounds to half the block (and so on), while an
    explicit ``round_to`` still refuses the unreachable target."""
    model, example = cnn((16, 16, 32))
    structure = ChannelStructure.build(model, example)
    lm = latency_model(model, example, tmp_path, block=16)
    torch.manual_seed(0)
    scores = {n: torch.rand(g.size) for n, g in structure.groups.items()}
    target = 0.8  # 16: at least 0.918 of the latency; 8: reachable
    with pytest.raises(ValueError, match="unreachable.*multiples of 16"):
        select_channels(structure, scores, "latency", target, latency=lm, round_to=16)
    plan = select_channels(structure, scores, "latency", target, latency=lm, round_to="auto")
    kept = {n: g.size - len(plan.get(n, [])) for n, g in structure.groups.items()}
    assert resource_size(structure, "latency", {n: len(v) for n, v in plan.items()}, lm) <= target * lm.measured_ms
    assert all(k % 8 == 0 for k in kept.values()) and any(k % 16 for k in kept.values()), kept
    assert resolve_round_to("auto", "latency", lm, structure, target) == 8
    assert resolve_round_to("auto", "latency", lm, structure, 0.95) == 16


def test_prediction_matches_the_measured_model_and_shrinks_with_widths(tmp_path: Path) -> None:
    model, example = cnn()
    lm = latency_model(model, example, tmp_path)
    structure = ChannelStructure.build(model, example)
    assert lm.predict(structure) == pytest.approx(lm.measured_ms)
    half = {n: g.size // 2 for n, g in structure.groups.items()}
    assert lm.predict(structure, half) < lm.predict(structure)
    assert all(s > 0 for s in lm.channel_savings(structure).values())
    assert lm.layers["features.0"].ins == [1]  # the input's 1 channel is not prunable


def test_unexplained_time_goes_with_the_norm_terms(tmp_path: Path) -> None:
    timer = FakeTimer()  # whole model: layers + 2 more BatchNorm-works of elementwise ops
    model, example = cnn()
    structure = ChannelStructure.build(model, example)
    lm = latency_model(model, example, tmp_path, measure=timer)
    weighted, norms = lm.sums(structure)
    assert lm.scale == 1 and lm.norm_scale == pytest.approx(FakeTimer.ELEMENTWISE)
    torch.manual_seed(5)
    for _ in range(3):  # against the timer on the physically pruned net
        plan = {n: sorted(torch.randperm(g.size)[: int(torch.randint(1, g.size - 1, ()))].tolist())
                for n, g in structure.groups.items()}  # fmt: skip
        truth = measured_ms(timer, model, example, plan, lm.batch_size)
        removed = {n: len(v) for n, v in plan.items()}
        assert lm.predict(structure, removed) == pytest.approx(truth, rel=1e-6)
        one_factor = lm.measured_ms * sum(lm.sums(structure, removed)) / (weighted + norms)
        assert abs(one_factor / truth - 1) > 0.01  # one factor on all layers would be wrong


def test_parse_target_and_selection_arguments(tmp_path: Path) -> None:
    assert parse_target(None, None, None, 0.5) == ("latency", 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        parse_target(0.5, None, None, 0.5)
    model, example = cnn()
    structure = ChannelStructure.build(model, example)
    scores = {n: torch.rand(g.size) for n, g in structure.groups.items()}
    with pytest.raises(ValueError, match="needs a LatencyModel"):
        select_channels(structure, scores, "latency", 0.5)
    with pytest.raises(ValueError, match="round_to"):
        select_channels(structure, scores, "flops", 0.5, round_to=0)
    with pytest.raises(ValueError, match="batch_size"):
        LatencyModel.build(structure, 0, cache_dir=tmp_path, measure=FakeTimer(), env=ENV)


@pytest.mark.parametrize("resource", ["flops", "latency", "channels"])
def test_round_to_never_overshoots_and_keeps_multiples(resource: str, tmp_path: Path) -> None:
    model, example = resnet20().eval(), torch.zeros(1, 3, 32, 32)
    structure = ChannelStructure.build(model, example, min_channels=3)
    lm = latency_model(model, example, tmp_path)
    base = baseline_of(structure, lm)
    torch.manual_seed(1)
    scores = {n: torch.rand(g.size) for n, g in structure.groups.items()}
    for round_to in (4, 8):
        for fraction in (0.3, 0.5, 0.7, 0.9):
            plan = select_channels(structure, scores, resource, fraction, "sqrt", latency=lm, round_to=round_to)
            removed = {n: len(v) for n, v in plan.items()}
            assert resource_size(structure, resource, removed, lm) <= fraction * getattr(base, resource)
            for name, k in removed.items():
                kept = structure.groups[name].size - k
                assert kept % round_to == 0 and kept >= structure.groups[name].min_keep, (name, kept)
                assert plan[name] == sorted(set(plan[name]))


def test_impossible_latency_target_raises_before_the_model_changes(tmp_path: Path, state_snapshot) -> None:
    model, example = cnn()
    lm = latency_model(model, example, tmp_path)
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=example)
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="latency=0.01 is unreachable"):
        lip.prune_to_target(model, scores, latency=0.01, latency_model=lm, min_channels=0.5)
    with pytest.raises(ValueError, match="rounded to multiples of 16"):
        lip.prune_to_target(model, scores, latency=0.3, latency_model=lm, round_to=16)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("round_to", [None, 8])
def test_prune_to_target_meets_a_latency_target(round_to: int | None, tmp_path: Path) -> None:
    model, example = cnn()
    lm = latency_model(model, example, tmp_path)
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=example)
    report = lip.prune_to_target(model, scores, latency=0.5, latency_model=lm, round_to=round_to)
    assert report.latency_before_ms == pytest.approx(lm.measured_ms)
    assert report.latency_after_ms <= 0.5 * report.latency_before_ms
    assert lm.predict(ChannelStructure.build(model, example)) == pytest.approx(report.latency_after_ms)
    if round_to:
        assert all(w % round_to == 0 for n, w in report.channels_after.items() if report.plan.get(n))


class OverheadTimer(FakeTimer):
    """The fake timer plus a fixed cost per whole-model call (framework overhead no layer shows)."""

    CONSTANT = 2e-4


def test_latency_checks_measure_refit_and_select_until_the_target_is_met(tmp_path: Path, monkeypatch) -> None:
    timer = OverheadTimer()
    monkeypatch.setattr(lat, "timer_measure", timer)
    model, example = cnn()
    assert type(model).__name__ == "SmallCNN"
    lm = latency_model(model, example, tmp_path, measure=timer)
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=example)
    x = torch.randn(lm.batch_size, *example.shape[1:])
    dense = timer(model, x)
    trusted, checked = copy.deepcopy(model), copy.deepcopy(model)
    lip.prune_to_target(trusted, scores, latency=0.5, latency_model=lm, round_to=None)
    assert timer(trusted, x) / dense > 0.52  # the layer sum spreads the overhead: it under-predicts
    report = lip.prune_to_target(checked, scores, latency=0.5, latency_model=lm, round_to=None, latency_checks=3)
    assert report.latency_measured_kept == pytest.approx(timer(checked, x) / dense)
    assert report.latency_measured_kept <= 0.5
    # the first check refits the model to the plan's measurement: the next plan is predicted exactly
    assert report.latency_after_ms == pytest.approx(1000 * timer(checked, x), rel=1e-6)
    assert report.latency_before_ms == pytest.approx(1000 * dense, rel=1e-6)
    with pytest.raises(ValueError, match="latency_checks needs a latency"):
        lip.prune_to_target(copy.deepcopy(model), scores, flops=0.5, latency_checks=2)


def measured_ms(timer: FakeTimer, model: nn.Module, example: torch.Tensor, plan: dict, batch: int) -> float:
    """The timer's whole-model ms of ``model`` with ``plan`` physically removed (on a copy)."""
    pruned = copy.deepcopy(model)
    prune_channels(ChannelStructure.build(pruned, example), plan)
    return 1000 * timer(pruned, torch.randn(batch, *example.shape[1:]))


def test_calibration_fits_time_that_no_layer_explains(tmp_path: Path, monkeypatch) -> None:
    timer = OverheadTimer()  # whole model: its layers, elementwise work and a constant the build cannot see
    monkeypatch.setattr(lat, "timer_measure", timer)
    model, example = cnn()
    structure = ChannelStructure.build(model, example)
    raw = latency_model(model, example, tmp_path, measure=timer)
    half = {n: list(range(g.size // 2)) for n, g in structure.groups.items()}
    point = ({n: len(v) for n, v in half.items()}, measured_ms(timer, model, example, half, raw.batch_size))
    fitted = raw.calibrated(structure, [point])
    assert len(fitted.calibration) == 1 and fitted.offset > 0 and raw.offset == 0 and not raw.calibration
    torch.manual_seed(3)
    for _ in range(3):  # plans the fit never saw, against the timer on the physically pruned net
        plan = {n: sorted(torch.randperm(g.size)[: int(torch.randint(0, g.size - 1, ()))].tolist())
                for n, g in structure.groups.items()}  # fmt: skip
        truth = measured_ms(timer, model, example, plan, raw.batch_size)
        removed = {n: len(v) for n, v in plan.items()}
        assert fitted.predict(structure, removed) == pytest.approx(truth, rel=1e-6)
        assert abs(raw.predict(structure, removed) / truth - 1) > 0.02
    assert fitted.predict(structure) == pytest.approx(raw.measured_ms)


def test_calibration_rejects_bad_points_and_falls_back_on_a_falling_fit(tmp_path: Path) -> None:
    model, example = cnn()
    structure = ChannelStructure.build(model, example)
    lm = latency_model(model, example, tmp_path)
    half = {n: g.size // 2 for n, g in structure.groups.items()}
    with pytest.raises(ValueError, match="positive measured latency"):
        lm.calibrated(structure, [(half, -1.0)])
    with pytest.raises(ValueError, match="unknown groups"):
        lm.calibrated(structure, [({"nope": 1}, 1.0)])
    slower = lm.calibrated(structure, [(half, 2 * lm.measured_ms)])  # thinner but measured slower: noise
    assert slower.norm_scale == lm.norm_scale and slower.offset > 0  # no negative norm weight: a constant only
    assert slower.predict(structure, half) > slower.predict(structure, half | {"features.8": 24})
    fitted = lm.calibrated(structure, [(half, 0.3 * lm.measured_ms)])
    assert fitted.predict(structure, half) == pytest.approx(0.3 * lm.measured_ms)
    assert fitted.predict(structure) == pytest.approx(lm.measured_ms)
    tiny = {n: g.size - 1 for n, g in structure.groups.items()}
    assert fitted.offset < 0 and fitted.scale * fitted.layer_sum(structure, tiny) + fitted.offset < 0  # extrapolated
    assert 0 < fitted.predict(structure, tiny) < fitted.predict(structure, half)  # shrinks in proportion instead
    again = fitted.calibrated(structure, [(tiny, 0.1 * lm.measured_ms)])
    assert len(again.calibration) == 2  # earlier points count too


def test_prune_to_target_builds_and_caches_a_latency_model(tmp_path: Path, monkeypatch) -> None:
    timer = FakeTimer()
    monkeypatch.setattr(lat, "timer_measure", timer)
    model, example = cnn()
    scores = lip.score_channels(model, criterion="magnitude", example_inputs=example)
    lip.prune_to_target(copy.deepcopy(model), scores, latency=0.6, latency_batch_size=4, latency_cache_dir=tmp_path)
    assert layer_calls(timer, model) > 0 and list(tmp_path.glob("*.json"))


def test_callback_prunes_to_a_latency_target(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(lat, "channel_block", lambda device: 1)  # the fake timer has no channel blocks
    monkeypatch.setattr(lat, "timer_measure", FakeTimer())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module = classifier()
    pruner = lip.InfluencePruningCallback(
        target_latency=0.6, latency_batch_size=8, round_to=4, criterion="magnitude",
        start_epoch=1, rounds=2, example_input=torch.zeros(1, 1, 8, 8), verbose=False,
    )  # fmt: skip
    cpu_trainer(tmp_path, 3, [pruner]).fit(module, loader(128))
    assert pruner.finished and pruner.baseline.latency is not None
    assert pruner.latency_ms(module) <= 0.6 * pruner.baseline.latency
    assert (tmp_path / "cache" / "lightning_ifprune" / "latency").is_dir()
    convs = [m for m in module.net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels in (16, 32) or c.out_channels % 4 == 0 for c in convs)
    assert any(c.out_channels not in (16, 32) for c in convs)
    with pytest.raises(ValueError, match="round_to"):
        lip.InfluencePruningCallback(target_latency=0.5, round_to=2.5)
    with pytest.raises(ValueError, match="latency_batch_size"):
        lip.InfluencePruningCallback(target_latency=0.5, latency_batch_size=0)


def test_app_passes_a_latency_target_and_reports_predictions(tmp_path: Path, monkeypatch, compose_cfg) -> None:
    monkeypatch.setattr(lat, "channel_block", lambda device: 1)  # the fake timer has no channel blocks
    monkeypatch.setattr(lat, "timer_measure", FakeTimer())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    cfg = compose_cfg(
        tmp_path / "run",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=2",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        "report.latency_iters=2", "report.latency_batch_size=8", "report.plot=false", "export.enabled=false",
        "model.net.widths=[8,16,32]", "prune=magnitude", "pretrain.epochs=0", "trainer.max_epochs=1",
        "prune.rounds=1", "prune.target_flops=null", "prune.target_latency=0.6", "prune.round_to=4",
    )  # fmt: skip
    summary = lip.app.train(cfg)
    torch.set_num_threads(threads)
    assert summary["target_resource"] == "latency" and summary["target_met"] is True
    assert summary["latency_predicted_after_ms"] <= 0.6 * summary["latency_predicted_before_ms"]
    assert summary["latency_before_ms"] > 0 and summary["latency_after_ms"] > 0
