"""LayerPruner: sparsity training drives useless gates to exactly 0, budgets are met, removal is exact at 0."""

import copy
import math

import pytest
import timm
import torch
from torch import nn

import resconv_plugin
from helpers import randomize_bn
from resconv_plugin import LayerPruner
from tiny_tasks import StripesNet, accuracy, stripes, train

X_TRAIN, Y_TRAIN = stripes(1024, seed=0)
X_TEST, Y_TEST = stripes(512, seed=1)


def stripes_run(useless_first: bool, reg: float = 0.5, steps: int = 300, mode: str = "proximal"):
    torch.manual_seed(0)
    net = StripesNet(useless_first)
    resconv_plugin.convert(net, X_TRAIN[:2])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = LayerPruner(net, X_TEST, reg=reg, optimizer=opt, mode=mode)
    train(net, pruner, opt, X_TRAIN, Y_TRAIN, steps)
    return net, pruner


def test_useless_layer_before_conv_bn_reaches_exactly_zero():
    """The loophole position: the useless layer feeds a conv + BatchNorm, yet only it goes to 0."""
    net, pruner = stripes_run(useless_first=True)
    gates = pruner.gates
    assert gates["useless.0"] == 0.0
    assert gates["needed.0"] > 0.3
    acc = accuracy(net, X_TEST, Y_TEST)
    assert acc > 0.95
    assert pruner.step() == ["useless.0"]
    assert pruner.last_step.max_abs_change == 0.0
    assert accuracy(net, X_TEST, Y_TEST) == acc


def test_needed_layer_before_conv_bn_stays_above_zero():
    """A needed layer followed by conv + BatchNorm keeps its gate: the convex gate leaves no free shrink to 0."""
    net, pruner = stripes_run(useless_first=False)
    assert pruner.gates["needed.0"] > 0.1
    assert accuracy(net, X_TEST, Y_TEST) > 0.95


def test_subgradient_mode_leaves_gates_near_not_at_zero():
    """torch-pruning's BNScalePruner-style L1: the useless gate gets small but not 0, so removal is not exact."""
    net, pruner = stripes_run(useless_first=True, mode="subgradient")
    assert 0.0 < abs(pruner.gates["useless.0"]) < 0.1
    pruner = LayerPruner(net, X_TEST, threshold=0.1)
    assert pruner.step() == ["useless.0"]
    assert pruner.last_step.max_abs_change > 0  # not exact: the measured change is reported


def test_proximal_step_follows_learning_rate_and_clears_momentum():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    resconv_plugin.convert(model, torch.randn(2, 4, 5, 5))
    gate = model[0].gamma
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pruner = LayerPruner(model, torch.randn(2, 4, 5, 5), reg=0.4, optimizer=opt)
    opt.zero_grad()
    pruner.regularize(model)
    opt.step()  # no gradients: only the proximal step, lr * reg = 0.2
    assert gate.item() == pytest.approx(0.8)
    for _ in range(5):
        model(torch.randn(2, 4, 5, 5)).sum().backward()  # momentum builds up
        pruner.regularize(model)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        gate.fill_(0.05)
    pruner.regularize(model)
    opt.step()  # 0.05 - 0.2 -> clamped to exactly 0, momentum cleared
    assert gate.item() == 0.0 and opt.state[gate]["momentum_buffer"].item() == 0.0
    opt.param_groups[0]["lr"] = 1e-4  # decayed lr: the shrink is tiny, yet nothing pushes the gate off 0
    opt.step()
    assert gate.item() == 0.0


def test_unarmed_optimizer_step_applies_nothing_and_penalty():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    resconv_plugin.convert(model, torch.randn(2, 4, 5, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = LayerPruner(model, torch.randn(2, 4, 5, 5), reg=0.4, optimizer=opt)
    opt.step()  # regularize() not called: e.g. during fine-tuning
    assert model[0].gamma.item() == 1.0
    assert pruner.penalty().item() == pytest.approx(0.4) and pruner.penalty().requires_grad


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    resconv_plugin.convert(model, x, level="block")
    resconv_plugin.convert(model, x)
    return model, x


@pytest.mark.parametrize("names", [["layer1.0.conv1", "layer2.1.conv1"], ["layer3.1"], ["layer1.1", "layer1.1.conv1"]],
                         ids=["layers", "block", "block-and-its-layer"])
def test_removal_at_zero_is_exact(resnet18, names):
    model, x = resnet18
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for n in names:
            gates[n].gamma.zero_()
        before = model(x)
    pruner = LayerPruner(model, x)
    removed = pruner.step()
    assert set(removed) == {n for n in names if not any(n.startswith(f"{m}.") for m in names)}
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert pruner.last_step.max_abs_change == 0.0
    assert all(n not in resconv_plugin.gated_modules(model) for n in names)


def test_removal_drops_relu_only_where_provably_identity(resnet18):
    model, x = resnet18
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for n in ["layer1.0.conv1", "layer2.0.conv2", "layer3.1"]:
            gates[n].gamma.zero_()
    pruner = LayerPruner(model, x)
    pruner.step()
    history = {h["name"]: h for h in pruner.pruning_history()}
    # conv1 of a BasicBlock reads the block input, a ReLU output: the ReLU after it is the identity and goes
    assert history["layer1.0.conv1"]["removed_activation"] == "layer1.0.act1"
    assert isinstance(model.layer1[0].act1, nn.Identity)
    # conv2 feeds the residual add: no activation directly after it
    assert history["layer2.0.conv2"]["removed_activation"] is None
    # a block's trailing ReLU acts on x alone once the branch is gone: x is a ReLU output, so the block goes whole
    assert history["layer3.1"] == {"name": "layer3.1", "kind": "block", "gamma": 0.0, "replaced_by": "identity",
                                   "removed_activation": "layer3.1.act2", "kept_activation": None}
    assert isinstance(model.layer3[1], nn.Identity)


def test_nonzero_removal_reports_change_and_recalibrates(resnet18):
    model, x = resnet18
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        gates["layer2.1.conv1"].gamma.fill_(0.2)
    pruner = LayerPruner(model, x, threshold=0.25)
    assert pruner.step(calibration_inputs=torch.randn(8, 3, 64, 64), recalibrate_bn=True) == ["layer2.1.conv1"]
    report = pruner.last_step
    assert report.max_abs_change > 0 and report.relative_change > 0
    assert report.recalibrated and report.change_after_recalibration is not None
    assert report.removed[0].gamma == pytest.approx(0.2)


def fused_flops(model, x):
    """FLOPs of the model as deployed (gates fused, BatchNorms folded): the pruner's denominator."""
    return resconv_plugin.count_flops(resconv_plugin.deployed(model), x).total


@pytest.mark.parametrize("target", [0.2, 0.45])
def test_flops_reduction_meets_target_within_one_layer(resnet18, target):
    model, x = resnet18
    x1 = x[:1]
    base = fused_flops(model, x1)
    torch.manual_seed(1)
    with torch.no_grad():  # a ranking as after sparsity training
        for g in resconv_plugin.gated_modules(model).values():
            g.gamma.uniform_(0, 1)
    pruner = LayerPruner(model, x1, flops_reduction=target)
    saved, total = pruner.savings("flops")
    assert total == base
    names = pruner.step()
    achieved = 1 - fused_flops(model, x1) / base
    largest = max(saved[n] for n in names) / base
    assert target <= achieved < target + largest
    assert achieved == pytest.approx(sum(saved[n] for n in names) / base, abs=0.01)


@pytest.mark.parametrize("level, names", [
    ("block", ["layer2.2", "layer1.1", "layer2.1"]),
    ("layer", ["layer1.1.conv1", "layer2.2.conv2", "layer3.1.conv1"]),
])
def test_flops_table_is_exactly_what_removal_saves(level, names):
    """The FLOPs table counts what each removal saves in the deployed model, exactly: a removed block's own
    activation once (it was counted twice: 25,088 FLOPs too many for these three blocks of cifar_resnet20, so a 35%
    budget was met on the table at 35.03% while the deployed model lost 34.95%)."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    randomize_bn(model)
    x = torch.randn(1, 1, 28, 28)
    resconv_plugin.convert(model, x, level=level)
    saved, total = LayerPruner(model, x, flops_reduction=0.1).savings("flops")
    before = resconv_plugin.count_flops(resconv_plugin.deployed(model), x).total
    with torch.no_grad():
        for name in names:
            resconv_plugin.gated_modules(model)[name].gamma.zero_()
    from resconv_plugin.fx.surgery import remove

    remove(model, names)
    after = resconv_plugin.count_flops(resconv_plugin.deployed(model), x).total
    assert total == before
    assert sum(saved[n] for n in names) == before - after


def test_gate_ratio_and_threshold(resnet18):
    model, x = resnet18
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for i, g in enumerate(gates.values()):
            g.gamma.fill_(i / len(gates))
    order = list(gates)
    pruner = LayerPruner(model, x, gate_ratio=0.5)
    assert pruner.select() == order[:math.floor(0.5 * len(order))]
    pruner = LayerPruner(model, x, threshold=2.5 / len(gates))
    assert pruner.select() == order[:3]


def test_latency_reduction_selection_meets_target(resnet18):
    """Real timing: the chosen set meets the table's goal after the measured correction (latency_fit)."""
    model, x = resnet18
    pruner = LayerPruner(model, x[:1], latency_reduction=0.2, latency_repeats=3)
    saved, total = pruner.savings("latency")
    chosen = pruner.select()
    fit = pruner.latency_fit
    assert set(saved) == set(pruner.gates) and total > 0
    assert fit["fraction"] == 0.2 and 1 <= len(fit["rounds"]) <= 4 and fit["rounds"][0]["scale"] == 1.0
    goal = min(0.2 * total * fit["scale"], resconv_plugin.pruning.set_saving(saved, list(saved)))
    best = fit["rounds"][fit["best"]]
    assert sorted(chosen) == best["removed"] and best["extra"] == fit["extra"]
    if fit["extra"] == 0:  # the table's set for the corrected goal
        assert resconv_plugin.pruning.set_saving(saved, chosen) >= goal * (1 - 1e-9)


def converted(arch):
    """A converted timm CIFAR ResNet (10 classes, one channel, seed 0) and a 28x28 example input."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, in_chans=1).eval()
    x = torch.randn(1, 1, 28, 28)
    resconv_plugin.convert(model, x)
    return model, x


def fake_latency(monkeypatch, table, clock):
    """The pruner's latency table and its measured check replaced by deterministic stand-ins."""
    from resconv_plugin.pruning import cost

    monkeypatch.setattr(cost, "latency_table", table)
    monkeypatch.setattr(cost, "measured_saving", clock)


def test_latency_table_sums_to_the_measured_saving_of_removing_every_gate(monkeypatch):
    """Single savings are rescaled so that the whole table predicts the model with every gate removed, timed against
    the full model like them (fake clock: full 10 ms, each single removal 9.5 ms, all removed 4 ms)."""
    from resconv_plugin.pruning import cost

    def clock(model, variants, example_inputs, **kwargs):
        return {"": 10.0, **{k: (4.0 if len(v) > 1 else 9.5) for k, v in variants.items()}}

    monkeypatch.setattr(cost, "_timed_removals", clock)
    model, x = converted("cifar_resnet20")
    names = list(resconv_plugin.fx.surgery.gated_modules(model))
    table, full = cost.latency_table(model, names, (x,))
    assert full == 10.0 and set(table) == set(names) and len(names) == 16
    assert all(v == pytest.approx(6.0 / 16) for v in table.values())  # 0.5 each, scaled to sum to 10 - 4
    assert cost.latency_table(model, names[:1], (x,))[0] == {names[0]: 0.5}  # one gate: nothing to scale by

    def drowned(model, variants, example_inputs, **kwargs):  # no single removal measured faster (12x12 input, a
        # loaded machine, 5 rounds: the CI failure "removes at most 0.000 of the model's latency")
        return {"": 10.0, **{k: (4.0 if len(v) > 1 else 10.2) for k, v in variants.items()}}

    monkeypatch.setattr(cost, "_timed_removals", drowned)
    table, full = cost.latency_table(model, names, (x,))
    assert all(v == pytest.approx(6.0 / 16) for v in table.values())  # what removing all saved, shared equally


def test_removal_signatures_group_the_layers_of_one_shape():
    """cifar_resnet20: 16 gated layers in 6 shapes (per stage conv1 / conv2; a stage's first conv1 strides, is not
    gated, and the first stage's conv1 / conv2 differ by the activation after them)."""
    from resconv_plugin.pruning import removal_signatures

    model, x = converted("cifar_resnet20")
    names = list(resconv_plugin.fx.surgery.gated_modules(model))
    signatures = removal_signatures(model, names, (x,))
    groups = {}
    for name in names:
        groups.setdefault(signatures[name], []).append(name)
    assert sorted(sorted(g) for g in groups.values()) == sorted([
        [f"layer1.{b}.conv1" for b in range(3)], [f"layer1.{b}.conv2" for b in range(3)],
        ["layer2.1.conv1", "layer2.2.conv1"], [f"layer2.{b}.conv2" for b in range(3)],
        ["layer3.1.conv1", "layer3.2.conv1"], [f"layer3.{b}.conv2" for b in range(3)]])


def test_latency_table_pools_the_layers_of_one_shape(monkeypatch):
    """Each shape's entries are the median of its layers' single savings (fake clock: layer1's conv1s measured 3.0,
    0.0 and 0.3 ms, a slow spell and noise), then scaled to what removing every gate saved; pool_identical=False
    keeps every measurement as it came."""
    from resconv_plugin.pruning import cost

    model, x = converted("cifar_resnet20")
    names = list(resconv_plugin.fx.surgery.gated_modules(model))
    single = {n: 0.4 for n in names}
    single.update({"layer1.0.conv1": 3.0, "layer1.1.conv1": 0.0, "layer1.2.conv1": 0.3, "layer3.1.conv1": 0.2})

    def clock(model, variants, example_inputs, **kwargs):
        return {"": 10.0, **{k: (10.0 - 6.4 if len(v) > 1 else 10.0 - single[k]) for k, v in variants.items()}}

    monkeypatch.setattr(cost, "_timed_removals", clock)
    table, full = cost.latency_table(model, names, (x,))
    pooled = dict(single, **{f"layer1.{b}.conv1": 0.3 for b in range(3)}, **{"layer3.1.conv1": 0.3,
                                                                              "layer3.2.conv1": 0.3})
    scale = 6.4 / sum(pooled.values())
    assert table == pytest.approx({n: v * scale for n, v in pooled.items()})
    raw, _ = cost.latency_table(model, names, (x,), pool_identical=False)
    assert raw == pytest.approx({n: v * 6.4 / sum(single.values()) for n, v in single.items()})


@pytest.fixture
def table_vs_clock(monkeypatch):
    """A deterministic latency table (each gate's FLOPs saving) and a fake clock on which a set really saves
    ``truth`` times what the table predicts; counts the clock's uses."""

    state = {"truth": 1.0, "timed": 0}

    def table(model, names, example_inputs, **kwargs):
        return resconv_plugin.pruning.flops_savings(model, names, example_inputs)

    def clock(model, names, example_inputs, **kwargs):
        state["timed"] += 1
        saved, total = resconv_plugin.pruning.flops_savings(model, list(names), example_inputs)
        return state["truth"] * resconv_plugin.pruning.set_saving(saved, list(names)), total

    fake_latency(monkeypatch, table, clock)
    model, x = converted("cifar_resnet20")
    return model, x, state


def true_saving(model, x, names):
    from resconv_plugin.fx.surgery import gated_modules

    saved, total = resconv_plugin.pruning.flops_savings(model, list(gated_modules(model)), x)
    return resconv_plugin.pruning.set_saving(saved, names) / total


@pytest.mark.parametrize("truth", [0.6, 1.5], ids=["table-overestimates", "table-underestimates"])
def test_latency_budget_is_met_as_measured(table_vs_clock, truth):
    """The table is off by a factor: the chosen set is timed, the goal corrected, and the final set meets the
    budget on the clock without overshooting it by more than the tolerance where the gates allow."""
    model, x, state = table_vs_clock
    state["truth"] = truth
    pruner = LayerPruner(model, x, latency_reduction=0.3)
    chosen = pruner.select()
    measured = truth * true_saving(model, x, chosen)
    assert measured >= 0.3
    fit = pruner.latency_fit
    assert fit["scale"] == pytest.approx(1 / truth, rel=0.2)  # the table's error, learnt from the first set
    assert fit["rounds"][0]["scale"] == 1.0 and fit["rounds"][0]["predicted"] >= 0.3
    assert fit["rounds"][0]["measured"] == pytest.approx(truth * fit["rounds"][0]["predicted"])
    assert (fit["rounds"][0]["measured"] < 0.3) == (truth < 1)  # the table's own set misses only if it overestimates
    assert len(fit["rounds"]) >= 2  # every timing is in the rounds: three for a set near the budget or above
    assert state["timed"] == sum(len(r["measurements"]) for r in fit["rounds"])
    assert all(len(r["measurements"]) == (3 if r["measurements"][0] >= 0.3 - 0.02 else 1) for r in fit["rounds"])
    # a table-only selection would have missed (0.6) or removed more than needed (1.5)
    table_only = resconv_plugin.pruning.select_within_budget(
        pruner.scores(), pruner.savings("latency")[0], 0.3 * pruner.savings("latency")[1], order=list(pruner.gates))
    assert (truth * true_saving(model, x, table_only) < 0.3) == (truth < 1)
    assert (len(chosen) < len(table_only)) == (truth > 1)


def test_latency_budget_is_met_when_the_table_errs_most_on_the_gates_chosen_first(monkeypatch):
    """cifar_resnet56 (52 layers): the table overestimates the least important layers (the first stage, chosen
    first) tenfold and underestimates the last stage twofold, as noise does to the entries a selection prefers. The
    table's error on one set says little about the next: the goal is interpolated between the sets measured on
    either side of the budget, and the set kept measures within the tolerance."""
    from resconv_plugin.fx.surgery import gated_modules

    weight = {"layer1": 0.1, "layer2": 1.0, "layer3": 2.0}

    def table(model, names, example_inputs, **kwargs):
        return resconv_plugin.pruning.flops_savings(model, names, example_inputs)

    def clock(model, names, example_inputs, **kwargs):
        saved, total = resconv_plugin.pruning.flops_savings(model, list(gated_modules(model)), example_inputs)
        return sum(weight[n.split(".")[0]] * saved[n] for n in names), total

    fake_latency(monkeypatch, table, clock)
    model, x = converted("cifar_resnet56")
    with torch.no_grad():
        for name, gate in gated_modules(model).items():
            gate.gamma.fill_({"layer1": 0.1, "layer2": 0.5, "layer3": 0.9}[name.split(".")[0]])
    pruner = LayerPruner(model, x, latency_reduction=0.2, importance="magnitude")
    chosen = pruner.select()
    seconds, total = clock(model, chosen, x)
    measured = seconds / total
    rounds = pruner.latency_fit["rounds"]
    assert rounds[0]["measured"] < 0.1 and any(r["measured"] > 0.3 for r in rounds)  # both sides were measured
    assert 0.2 <= measured <= 0.2 + 0.02


def test_one_disturbed_timing_does_not_decide_the_latency_fit(table_vs_clock, monkeypatch):
    """The first timing of the first set reads three times its saving (a busy machine; seen on cifar_resnet20:
    0.685 read for five layers whose model then measured 0.221): the set is timed twice more, counts by the median
    reading, and the fit goes on to a set that meets the budget on the true clock."""
    from resconv_plugin.pruning import cost

    model, x, state = table_vs_clock
    honest = cost.measured_saving

    def glitch(model, names, example_inputs, **kwargs):
        seconds, total = honest(model, names, example_inputs, **kwargs)
        return (3 * seconds if state["timed"] == 1 else seconds), total

    monkeypatch.setattr(cost, "measured_saving", glitch)
    state["truth"] = 0.6  # the table overestimates: its first set really saves less than asked
    pruner = LayerPruner(model, x, latency_reduction=0.3)
    chosen = pruner.select()
    first = pruner.latency_fit["rounds"][0]
    assert first["measurements"][0] >= 0.3 > first["measured"] == first["measurements"][1] == first["measurements"][2]
    assert 0.6 * true_saving(model, x, chosen) >= 0.3


def test_one_disturbed_timing_short_of_the_budget_does_not_decide_either(table_vs_clock, monkeypatch):
    """The table is exact and its set meets the budget, but the set's first timing reads 0.005 short (seen on
    cifar_resnet20: four blocks read 0.397 of 0.40 asked, the fit took a fifth, ~0.1 of the latency more): a timing
    within the tolerance below the budget is timed twice more and the set kept by the median reading. A set that is
    truly 0.01 short (more than FIT_SLACK) reads short three times and is not kept."""
    from resconv_plugin.pruning import cost

    model, x, state = table_vs_clock
    honest = cost.measured_saving
    exact = LayerPruner(model, x, latency_reduction=0.3)
    table_set = exact.select()
    saving = true_saving(model, x, table_set)
    assert saving >= 0.3 and exact.latency_fit["best"] == 0

    def glitch(model, names, example_inputs, **kwargs):
        seconds, total = honest(model, names, example_inputs, **kwargs)
        return ((0.3 - 0.005) * total if state["timed"] == 1 else seconds), total

    monkeypatch.setattr(cost, "measured_saving", glitch)
    state["timed"] = 0
    pruner = LayerPruner(model, x, latency_reduction=0.3)
    assert pruner.select() == table_set  # kept: not a larger set
    first = pruner.latency_fit["rounds"][0]
    assert first["measurements"] == pytest.approx([0.295, saving, saving]) and first["measured"] == pytest.approx(saving)
    assert pruner.latency_fit["best"] == 0

    monkeypatch.setattr(cost, "measured_saving", honest)
    state["truth"] = 0.29 / saving  # really 0.01 short, on every timing
    pruner = LayerPruner(model, x, latency_reduction=0.3)
    chosen = pruner.select()
    first = pruner.latency_fit["rounds"][0]
    assert first["removed"] == sorted(table_set) and first["measurements"] == pytest.approx([0.29] * 3)
    assert state["truth"] * true_saving(model, x, chosen) >= 0.3 and len(chosen) > len(table_set)


@pytest.mark.parametrize("zeroed_blocks, fraction_at", [(3, 0.5), (9, 0.1)])
def test_latency_budget_adds_the_gates_the_table_zeroed_as_few_as_needed(monkeypatch, zeroed_blocks, fraction_at):
    """Noise left entries of the table at 0 (conv2s that each really save time) and the table overestimates by
    1 / 0.85: choosing the table's whole saving still misses the budget as measured, so the fit adds the zeroed
    gates, least important first: all of them measured, then as few as meet the budget (not every gate: a
    cifar_resnet56 fit once removed all 52 for a budget 34 nearly met); a later ranking reuses that without timing."""
    from resconv_plugin.fx.surgery import gated_modules

    zeroed = {f"layer{s}.{b}.conv2" for s in (3, 2, 1) for b in range(3)}
    zeroed = set(sorted(zeroed, key=lambda n: -int(n[5]))[:zeroed_blocks])
    timed = []

    def table(model, names, example_inputs, **kwargs):
        saved, total = resconv_plugin.pruning.flops_savings(model, names, example_inputs)
        return {n: (0.0 if n in zeroed else v) for n, v in saved.items()}, total

    def clock(model, names, example_inputs, **kwargs):
        timed.append(sorted(names))
        saved, total = resconv_plugin.pruning.flops_savings(model, list(gated_modules(model)), example_inputs)
        return 0.85 * resconv_plugin.pruning.set_saving(saved, list(names)), total

    fake_latency(monkeypatch, table, clock)
    model, x = converted("cifar_resnet20")
    names = list(gated_modules(model))
    saved, total = table(model, names, (x,))
    in_table = sum(saved.values()) / total  # what the table says removing every gate saves
    every = 0.85 * true_saving(model, x, names)
    # between what the table's whole saving measures and what every gate removed measures
    fraction = 0.85 * in_table + fraction_at * (every - 0.85 * in_table)
    pruner = LayerPruner(model, x, latency_reduction=fraction)
    chosen = pruner.select()
    fit = pruner.latency_fit
    table_set = [r for r in fit["rounds"] if r["extra"] == 0][-1]["removed"]
    assert table_set and not zeroed & set(table_set)  # the table's whole saving, measured short
    assert any(r["every"] for r in fit["rounds"])  # all the zeroed gates added: measured, meets it
    assert set(table_set) < set(chosen) and set(chosen) - set(table_set) <= zeroed
    assert len(chosen) == len(table_set) + fit["extra"] and 0 < fit["extra"] < len(zeroed)
    clock_of = lambda names: 0.85 * true_saving(model, x, names)
    assert clock_of(chosen) >= fraction  # met, and one zeroed gate fewer would not be
    assert any(r["extra"] == fit["extra"] - 1 and r["measured"] < fraction for r in fit["rounds"])
    count = len(timed)
    assert sorted(pruner.rank()) == sorted(chosen) and len(timed) == count  # reused, not timed again


def test_latency_fit_is_reused_and_travels_with_the_state(table_vs_clock):
    model, x, state = table_vs_clock
    state["truth"] = 0.6
    pruner = LayerPruner(model, x, latency_reduction=0.3)
    chosen = pruner.select()
    timed = state["timed"]
    assert pruner.rank() == chosen and state["timed"] == timed  # a second ranking reuses the fit: no timing
    other = LayerPruner(model, x, latency_reduction=0.3)
    other.load_state_dict(pruner.state_dict())
    state["truth"] = 5.0  # a clock that would now give another answer: not consulted
    assert other.rank() == chosen and state["timed"] == timed
    assert other.latency_fit == pruner.latency_fit
    other.latency_reduction = 0.2  # another budget: fitted anew
    other.rank()
    assert state["timed"] > timed and other.latency_fit["fraction"] == 0.2


@pytest.mark.parametrize("steps", [30, 3, 1])
def test_budget_driven_sparsity_zeroes_the_budget(steps):
    """With a budget and sparsity_steps, the layers that meet it are exactly 0 at the end; removal is exact. Also
    with very few steps (the cap of each step is the one after it: with 3 steps it once stayed at 0.11)."""
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    resconv_plugin.convert(model, x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = LayerPruner(model, x[:1], flops_reduction=0.4, optimizer=opt, sparsity_steps=steps,
                         calibration_inputs=x)
    base = fused_flops(model, x[:1])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize(model)
        opt.step()
    chosen = pruner.select()
    assert chosen and all(pruner.gates[n] == 0.0 for n in chosen)
    pruner.step()
    assert pruner.last_step.max_abs_change == 0.0
    assert 1 - fused_flops(model, x[:1]) / base >= 0.4


def test_ignored_layers(resnet18):
    """Each entry covers the module and everything inside it (torch-pruning's rule): a stage, a block by name, a
    layer by its inner conv; a class covers every instance and what it holds."""
    model, x = resnet18
    everything = set(resconv_plugin.gated_modules(model))
    pruner = LayerPruner(model, x, ignored_layers=[model.layer1, "layer2.0", model.layer3[1].conv1.conv])
    expected = {n for n in everything if not n.startswith(("layer1.", "layer2.0"))} - {"layer3.1.conv1"}
    assert set(pruner.gates) == expected and "layer2.1" in expected and "layer3.1" in expected
    with pytest.raises(ValueError, match="ignored_layers cover all 13 gates of ResNet"):
        LayerPruner(model, x, ignored_layers=[timm.models.resnet.BasicBlock])


def test_history_rebuilds_structure(resnet18):
    model, x = resnet18
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for n in ["layer1.0", "layer3.1.conv1"]:
            resconv_plugin.gated_modules(model)[n].gamma.zero_()
    pruner = LayerPruner(model, x)
    pruner.step()
    history = pruner.pruning_history()
    other = LayerPruner(fresh, x)
    other.load_pruning_history(history)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    assert other.pruning_history() == [dict(h, gamma=1.0) for h in history]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(threshold=0.1, flops_reduction=0.3), ValueError, "exactly one selection mode.*threshold, flops_reduction"),
    (dict(gate_ratio=1.0), ValueError, r"gate_ratio must be in \[0, 1\)"),
    (dict(flops_reduction=-0.1), ValueError, r"flops_reduction must be in \[0, 1\)"),
    (dict(latency_reduction="0.3"), TypeError, "latency_reduction must be a float"),
    (dict(threshold=1.5), ValueError, r"threshold must be in \[0, 1\]"),
    (dict(flops_reduction=0.95), ValueError, r"flops_reduction=0.95 is unreachable: .* at most 0\.\d+ of"),
    (dict(mode="l2"), ValueError, "mode must be one of"),
    (dict(reg=-1), ValueError, "reg must be a non-negative float"),
    (dict(sparsity_steps=0), ValueError, "sparsity_steps must be a positive int"),
    (dict(cap_start=0.8), ValueError, r"cap_start must be in \[0, zero_at=0.75\)"),
    (dict(ignored_layers=[3]), TypeError, "ignored_layers entries"),
])
def test_bad_arguments(resnet18, kwargs, error, match):
    model, x = resnet18
    with pytest.raises(error, match=match):
        LayerPruner(model, x, **kwargs)


def test_model_without_gates():
    with pytest.raises(ValueError, match="has no ResConv layer or gated block: call resconv_plugin.convert"):
        LayerPruner(timm.create_model("resnet18"), torch.randn(1, 3, 64, 64))


def test_proximal_mode_finds_the_optimizer(resnet18):
    """Without optimizer= (it used to raise), the proximal step follows the step of the optimizer that holds the
    gates, at its learning rate (tests/test_api.py has the training loop)."""
    model, x = resnet18
    pruner = LayerPruner(model, x, reg=0.5)
    opt = torch.optim.SGD([g.gamma for g in resconv_plugin.gated_modules(model).values()], lr=0.1)
    pruner.regularize(model)
    assert set(pruner.gates.values()) == {1.0}  # nothing before the optimizer's step
    opt.step()  # no gradient: only the proximal step
    assert list(pruner.gates.values()) == pytest.approx([1.0 - 0.1 * 0.5] * len(pruner.gates))
    assert pruner.steps_done == 1
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        pruner.attach("sgd")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.act(x + self.bn(self.conv(x)))


def test_block_keeps_its_activation_when_input_may_be_negative():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _Block(), nn.Conv2d(4, 2, 1))  # block input: BN output
    x = torch.randn(2, 3, 6, 6)
    resconv_plugin.convert(model, x, level="block")
    model.eval()
    with torch.no_grad():
        model[2].bn.gamma.zero_()
        before = model(x)
    pruner = LayerPruner(model, x)
    assert pruner.step() == ["2"]
    assert pruner.pruning_history()[0]["replaced_by"] == "activation"
    assert pruner.pruning_history()[0]["kept_activation"] == "2.act"
    assert isinstance(model[2], nn.ReLU)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_freeze_gates_after_step_keeps_gates_through_fine_tuning():
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    x = torch.randn(8, 1, 28, 28)
    resconv_plugin.convert(model, x)
    early = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # built before freezing
    pruner = LayerPruner(model, x, gate_ratio=0.25)
    with torch.no_grad():
        for i, gate in enumerate(resconv_plugin.gated_modules(model).values()):
            gate.gamma.fill_(0.0 if i % 4 == 0 else 0.7)
    assert len(pruner.step()) == 4
    assert resconv_plugin.freeze_gates(model) == 12
    gates = resconv_plugin.gated_modules(model)
    assert all(not g.gamma.requires_grad for g in gates.values())
    late = create_optimizer_v2(model, "sgd", lr=0.5)
    assert not any(p is g.gamma for group in late.param_groups for p in group["params"] for g in gates.values())
    before = {n: g.gamma.item() for n, g in gates.items()}
    weight = model.conv1.weight.detach().clone()
    for opt in (early, late):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(8)).backward()
        opt.step()
    assert {n: g.gamma.item() for n, g in gates.items()} == before
    assert not torch.equal(model.conv1.weight, weight)
    assert resconv_plugin.freeze_gates(model, frozen=False) == 12
    assert all(g.gamma.requires_grad for g in gates.values())


@pytest.mark.parametrize("args, error, match", [((nn.Linear(2, 2), 1), TypeError, "frozen must be a bool"),
                                                (("model",), TypeError, "model must be a torch.nn.Module")])
def test_freeze_gates_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        resconv_plugin.freeze_gates(*args)


class _InplaceBlock(nn.Module):
    """A block in timm's style (in-place ReLU, ``out += shortcut``) whose input may be negative (a BN output)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        shortcut = x
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return out


def test_removed_layer_keeps_the_shortcut_intact_and_trains_under_host_inplace_ops():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _InplaceBlock(), nn.Conv2d(4, 2, 1)))
    x = torch.randn(2, 3, 6, 6)
    resconv_plugin.convert(model.eval(), x)
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        gates["2.conv1"].gamma.zero_()  # conv1 reads the block input, which the shortcut reads too
        before = model(x)
    pruner = LayerPruner(model, x)
    assert pruner.step() == ["2.conv1"]
    # the ReLU now acts on the block input itself: in place it would overwrite the shortcut (the input is negative
    # in places, so the output would change); it is switched to out of place and the output is exactly the same
    assert isinstance(model[2].conv1, resconv_plugin.nn.RemovedLayer) and model[2].act1.inplace is False
    with torch.no_grad():
        assert (model[1](model[0](x)) < 0).any()
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert pruner.last_step.max_abs_change == 0.0


def test_fine_tuning_after_removal_in_timm_resnet18():
    """conv2 removed: timm's ``x += shortcut`` lands on act1's output, which autograd saved (the ResNet-18 ablation
    row failed with 'modified by an inplace operation' before RemovedLayer copied its input under autograd)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    resconv_plugin.convert(model, x)
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for name in ["layer1.0.conv2", "layer4.1.conv2", "layer2.1.conv1", "layer2.1.conv2"]:
            gates[name].gamma.zero_()
        before = model(x)
    LayerPruner(model, x).step()
    assert model.layer1[0].act1.inplace is True  # conv2's input is read by nothing else: in place stays
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        assert model.layer2[1].conv1(x) is x  # no copy for inference
    resconv_plugin.freeze_gates(model)
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()


def test_a_latency_budget_the_table_finds_short_is_measured_before_it_is_refused(monkeypatch):
    """The table is scaled to one timing of removing every gate; when it says the budget is out of reach, removing
    every gate is timed three more times and the median decides (fake clock: the table's timing read 0.3 of the
    latency, the three measurements 0.5, 0.2, 0.45: median 0.45)."""
    model, x = converted("cifar_resnet20")
    names = list(resconv_plugin.fx.surgery.gated_modules(model))
    readings = []

    def table(model, names, example_inputs, **kwargs):
        return {n: 0.3 / len(names) for n in names}, 1.0

    def clock(model, chosen, example_inputs, **kwargs):
        readings.append(len(chosen))
        return [0.5, 0.2, 0.45][(len(readings) - 1) % 3] if len(chosen) == len(names) else 0.4, 1.0

    fake_latency(monkeypatch, table, clock)
    LayerPruner(copy.deepcopy(model), x, latency_reduction=0.4)  # median 0.45 >= 0.4: accepted
    assert readings[:3] == [len(names)] * 3
    readings.clear()
    with pytest.raises(ValueError, match=r"latency_reduction=0.46 is unreachable: .* at most 0\.450 of"):
        LayerPruner(copy.deepcopy(model), x, latency_reduction=0.46)
    assert readings == [len(names)] * 3


def test_removal_importance_can_read_each_variant_with_batchnorm_re_estimated():
    """recalibrate=True scores each removal with the BatchNorm statistics re-estimated on the calibration batch
    (the reference too) and leaves the model's own statistics as they were; on a model whose statistics are off
    the scores differ from the raw ones."""
    from resconv_plugin.pruning.importance import GateRemovalImportance

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    resconv_plugin.convert(model, x[:1], level="block")
    randomize_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = resconv_plugin.fx.surgery.gated_modules(model)
    raw = GateRemovalImportance()(model, gates, inputs=(x,), targets=y)
    recalibrated = GateRemovalImportance(recalibrate=True)(model, gates, inputs=(x,), targets=y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(raw) == set(recalibrated) == set(gates)
    assert any(abs(raw[n] - recalibrated[n]) > 1e-3 for n in gates)
    with pytest.raises(TypeError, match="recalibrate must be a bool, got str"):
        GateRemovalImportance(recalibrate="yes")


def test_removal_bn_names_removal_with_batchnorm_re_estimated_chosen_once():
    """``importance="removal-bn"``: GateRemovalImportance(recalibrate=True); like every criterion but magnitude, the
    set is chosen once, as the pruner is built, and kept while the cap falls."""
    model, x = converted("cifar_resnet20")
    calib = torch.randn(16, 1, 28, 28)
    pruner = LayerPruner(model, x, importance="removal-bn", flops_reduction=0.3, sparsity_steps=10,
                         calibration_inputs=calib)
    assert repr(pruner.importance) == "GateRemovalImportance(iterative=False, recalibrate=True)"
    assert pruner.reselect_every is None and pruner.select() == pruner.rank()


def test_the_latency_fit_bisects_when_its_correction_lands_on_a_set_already_measured():
    """A table that over-predicts every gate alike (0.05 predicted, 0.037 measured): the first set (8 gates) measures
    short, the table's error then asks for 12 (0.444, over the window), and interpolating between them asks for the
    12 again. The fit bisects the goal between the two instead of stopping there: 10 gates (short), then 11, which
    measure 0.407, inside [0.40, 0.42]."""
    from resconv_plugin.pruning.latency_fit import fit_latency_goal

    names = [f"g{i}" for i in range(20)]
    saved = {n: 0.05 for n in names}

    def choose(goal: float, extra: int) -> list:
        return names[:min(len(names), math.ceil(goal / 0.05 - 1e-9)) + extra]

    goal, extra, fit = fit_latency_goal(choose, lambda chosen: 0.037 * len(chosen), saved, 1.0, 0.4)
    assert [len(r["removed"]) for r in fit["rounds"]] == [8, 12, 10, 11]
    assert len(choose(goal, extra)) == 11 and fit["rounds"][fit["best"]]["measured"] == pytest.approx(0.407)


def test_the_latency_fit_looks_past_a_first_set_that_overshot():
    """Every gate predicted at 0.05; the first seven save 0.41 together as measured, the eighth 0.02 more. The first
    set (8 gates) measures 0.43, over [0.40, 0.42], and the table's correction chooses the same 8 again. The fit
    tries smaller goals, twice as far each time, and measures the 7 it finds: 0.41, inside the window."""
    from resconv_plugin.pruning.latency_fit import fit_latency_goal

    names = [f"g{i}" for i in range(20)]
    saved = {n: 0.05 for n in names}
    real = {n: (0.41 / 7 if i < 7 else 0.02) for i, n in enumerate(names)}

    def choose(goal: float, extra: int) -> list:
        return names[:min(len(names), math.ceil(goal / 0.05 - 1e-9)) + extra]

    goal, extra, fit = fit_latency_goal(choose, lambda chosen: sum(real[n] for n in chosen), saved, 1.0, 0.4)
    assert [len(r["removed"]) for r in fit["rounds"]] == [8, 7] and len(choose(goal, extra)) == 7
    assert fit["rounds"][fit["best"]]["measured"] == pytest.approx(0.41)


@pytest.mark.parametrize("per_gate, kept", [(0.0399, 10), (0.0394, 11)], ids=["short-by-0.001", "short-by-0.006"])
def test_the_latency_fit_counts_a_set_short_by_timing_noise_as_meeting_the_budget(per_gate, kept):
    """cifar_resnet56 in ONNX Runtime at batch 32: ten blocks timed 0.399 of 0.40 asked, eleven 0.439, and the fit
    kept eleven (0.561 of the latency against 0.6 asked). A set short by at most FIT_SLACK (0.005) meets the budget
    and is kept; one short by more does not, and the next set is."""
    from resconv_plugin.pruning.latency_fit import FIT_SLACK, fit_latency_goal

    assert FIT_SLACK == 0.005
    names = [f"g{i}" for i in range(20)]
    saved = {n: 0.05 for n in names}

    def choose(goal: float, extra: int) -> list:
        return names[:min(len(names), math.ceil(goal / 0.05 - 1e-9)) + extra]

    goal, extra, fit = fit_latency_goal(choose, lambda chosen: per_gate * len(chosen), saved, 1.0, 0.4)
    assert len(choose(goal, extra)) == kept
    assert fit["rounds"][fit["best"]]["measured"] == pytest.approx(per_gate * kept)
    assert {len(r["removed"]) for r in fit["rounds"]} >= {10, 11}  # both sides of the budget were timed
