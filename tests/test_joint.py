"""JointPruner: one budget split between depth and width by measurement. Hand-built nets where one side is clearly
better (free to remove), a deterministic cost (FLOPs) so that nothing depends on timing."""

import pytest
import torch
from torch import nn

import resconv_plugin
from resconv_plugin.pruning import FixedSetImportance, JointPruner, LayerPruner

C = 8


class Chain(nn.Module):
    """stem conv (1 -> C) + BN + ReLU, then six C -> C conv + BN layers (each becomes a ResConv), mean pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU())
        self.layers = nn.Sequential(*[nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
                                      for _ in range(6)])
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


def make(identity_layers=(), dead_channels=()):
    torch.manual_seed(0)
    net = Chain()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
        for i in identity_layers:  # centre tap + neutral BatchNorm: the layer computes its input
            conv, bn = net.layers[i]
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(C)
            bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps), bn.weight.fill_(1), bn.bias.zero_()
        for c in dead_channels:  # a channel that is 0 everywhere and feeds nothing: free to prune
            net.stem[0].weight[c].zero_()
            net.stem[1].weight[c], net.stem[1].bias[c], net.stem[1].running_mean[c] = 0.0, 0.0, 0.0
            for conv, bn in net.layers:
                conv.weight[c].zero_(), conv.weight[:, c].zero_()
                bn.weight[c], bn.bias[c], bn.running_mean[c] = 0.0, 0.0, 0.0
            net.head.weight[:, c].zero_()
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    resconv_plugin.convert(net.eval(), x[:1])
    return net, x


def test_chooses_pure_depth_where_layers_are_free_to_remove():
    net, x = make(identity_layers=(1, 3, 5))
    plan = JointPruner(net, x[:1], 0.3, calibration_inputs=x, cost="flops").plan()
    best = plan.best
    assert best.depth_share == 1.0 and best.channel_ratio == 0.0
    assert set(best.depth_names) <= {"layers.1.0", "layers.3.0", "layers.5.0"}
    assert best.cost_rel <= 0.7  # the budget is met
    width = next(c for c in plan.candidates if c.depth_share == 0.0)
    assert width.channel_ratio > 0 and width.cost_rel <= 0.7
    assert best.score < 1e-9 < width.score  # an exact removal costs nothing


def test_chooses_pure_width_where_channels_are_free_to_remove():
    net, x = make(dead_channels=(0, 3, 5, 6))
    pruner = JointPruner(net, x[:1], 0.4, calibration_inputs=x, cost="flops", depth_shares=(0.0, 0.5, 1.0))
    plan = pruner.plan()
    best = plan.best
    assert best.depth_share == 0.0 and not best.depth_names and best.channel_ratio > 0
    assert best.cost_rel <= 0.6
    depth = next(c for c in plan.candidates if c.depth_share == 1.0)
    assert depth.depth_names and best.score < 1e-9 < depth.score
    pruned = pruner.apply(best)  # the one-shot model computes what the unpruned one did
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-4, atol=1e-5)


def test_budget_met_within_one_channel_group():
    """The channel ratio found is the smallest that meets the budget: one channel group less would miss it."""
    net, x = make()
    pruner = JointPruner(net, x[:1], 0.35, calibration_inputs=x, cost="flops", depth_shares=(0.0,))
    best = pruner.plan().best
    assert best.cost_rel <= 0.65
    kept = [m.out_channels for m in pruner.apply(best).modules() if isinstance(m, nn.Conv2d)][0]
    assert kept < C
    one_less = pruner.prune_channels(pruner.model, (C - kept - 1) / C)  # one channel (this net's group) fewer pruned
    assert [m.out_channels for m in one_less.modules() if isinstance(m, nn.Conv2d)][0] == kept + 1
    assert pruner.cost_rel(one_less) > 0.65


def convs(model):
    """A cost only layer removal lowers: the number of convolutions of the deployed model."""
    return float(sum(isinstance(m, nn.Conv2d) for m in model.modules()))


def test_splits_that_cannot_reach_the_budget_are_listed_not_fatal():
    """Cost = number of convs (7: stem + 6 layers): channel pruning never lowers it, so the splits whose layers
    alone stay above 0.75 of it (shares 0, 0.25, 0.5: at most one layer) are unreachable; shares 0.75 and 1 remove
    two layers (5 / 7 = 0.714) and are scored."""
    net, x = make()
    plan = JointPruner(net, x[:1], 0.25, calibration_inputs=x, cost=convs).plan()
    assert plan.unreachable == [0.0, 0.25, 0.5]
    assert [c.depth_share for c in plan.candidates] == [0.75, 1.0]
    assert all(len(c.depth_names) == 2 and c.channel_ratio == 0.0 and c.cost_rel == pytest.approx(5 / 7)
               for c in plan.candidates)
    assert plan.best.depth_share in (0.75, 1.0)
    with pytest.raises(ValueError, match="no split of the budget reaches 0.050 of the cost"):
        JointPruner(net, x[:1], 0.95, calibration_inputs=x, cost=convs).plan()  # even 6 layers leave 1 / 7
    pruner = JointPruner(net, x[:1], 0.25, calibration_inputs=x, cost=convs)
    with pytest.raises(ValueError, match="does not reach 0.750 of the cost"):
        pruner.meet(net)
    model, ratio, rel = pruner.meet(net, strict=False)  # the cheapest try: no ratio lowers this cost, so none
    assert rel == 1.0 and ratio == 0.0
    assert len(pruner.last_search.tries) == 13 and not pruner.last_search.met  # ratio 0, then 12 bisection steps


def test_the_depth_side_is_measured_once_for_every_share(monkeypatch):
    """One LayerPruner ranks the layers of every share: its cost table (the latency table: every gate's removal
    timed) and the gates' importance are measured once, and each share's set is the one a LayerPruner of that
    share's budget alone chooses."""
    from resconv_plugin.pruning import pruner as pruner_module

    from resconv_plugin.pruning.importance import RemovalImportance

    calls, scored = [], []
    measured, importance = pruner_module.flops_savings, RemovalImportance.__call__
    monkeypatch.setattr(pruner_module, "flops_savings", lambda *a, **k: calls.append(1) or measured(*a, **k))
    monkeypatch.setattr(RemovalImportance, "__call__", lambda *a, **k: scored.append(1) or importance(*a, **k))
    net, x = make(identity_layers=(1, 3, 5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruner = JointPruner(net, x[:1], 0.4, calibration_inputs=x, cost="flops", depth_shares=(0.25, 0.5, 1.0))
    plan = pruner.plan()
    assert len(calls) == 1 and len(scored) == 1
    assert [len(c.depth_names) for c in plan.candidates] == [1, 2, 3]
    for c in plan.candidates:
        alone = LayerPruner(net, x[:1], importance="removal", flops_reduction=c.depth_share * 0.4,
                            calibration_inputs=x)
        assert sorted(alone.rank()) == sorted(c.depth_names)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the model itself is untouched


def test_a_candidate_whose_recovery_diverged_never_wins():
    """A NaN score (recovery steps that blew up) ranks last wherever it stands in the list; ties go to depth."""
    from resconv_plugin.pruning import JointPlan, SplitCandidate

    def cand(share, score):
        return SplitCandidate(depth_share=share, depth_names=[], channel_ratio=0.0, cost_rel=0.6, score=score)

    for scores in ([float("nan"), 0.9, 0.4], [0.4, float("nan"), 0.9], [0.9, 0.4, float("inf")]):
        plan = JointPlan(target_rel=0.6, candidates=[cand(i / 2, x) for i, x in enumerate(scores)])
        assert plan.best.score == 0.4
    plan = JointPlan(target_rel=0.6, candidates=[cand(0.0, 0.5), cand(1.0, 0.5), cand(0.5, float("nan"))])
    assert plan.best.depth_share == 1.0
    only = JointPlan(target_rel=0.6, candidates=[cand(0.0, float("nan"))])
    assert only.best.depth_share == 0.0  # nothing better to choose


def test_fixed_set_importance_trains_a_chosen_set():
    net, x = make()
    names = ["layers.0.0", "layers.4.0"]
    pruner = LayerPruner(net, x[:1], importance=FixedSetImportance(names), pruning_ratio=2 / 6)
    assert sorted(pruner.select()) == names
    with pytest.raises(ValueError, match="names gates the pruner does not have"):
        LayerPruner(net, x[:1], importance=FixedSetImportance(["nope"]), pruning_ratio=0.3).select()
    with pytest.raises(TypeError, match="names must be a sequence of gate names"):
        FixedSetImportance("layers.0.0")


def _labelled_batches(net, x, seen):
    """Two batches of ``x`` labelled by the unpruned net's own predictions (a task a pruned copy can recover);
    each batch drawn appends its index to ``seen``."""
    with torch.no_grad():
        y = net(x).argmax(1)

    class Batches:
        def __iter__(self):
            for i in range(2):
                seen.append(i)
                yield x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]

    return Batches(), y


def test_recovery_trains_each_candidate_on_the_same_batches_before_scoring():
    net, x = make()
    seen = []
    batches, y = _labelled_batches(net, x, seen)
    pruner = JointPruner(net, x[:1], 0.3, calibration_inputs=x, calibration_targets=y, cost="flops",
                         depth_shares=(0.0, 1.0), recovery_batches=batches, recovery_steps=3, recovery_lr=0.05)
    plan = pruner.plan()
    assert seen == [0, 1, 0] * 2  # 3 steps per candidate over a 2-batch set: started again from its first batch
    for c in plan.candidates:
        assert c.recovery_steps == 3 and c.oneshot_score is not None
        assert c.score < c.oneshot_score  # trained towards the unpruned net's labels
        # the score is the task loss of the recovered copy as deployed (its own BatchNorm statistics): redone by hand
        model = pruner.recover(pruner.apply(c))
        with torch.no_grad():
            expected = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
        assert c.score == pytest.approx(expected, rel=1e-5)
    assert plan.best.score == min(c.score for c in plan.candidates)
    one_shot = JointPruner(net, x[:1], 0.3, calibration_inputs=x, calibration_targets=y, cost="flops",
                           depth_shares=(0.0, 1.0)).plan()
    assert [c.score for c in one_shot.candidates] == pytest.approx([c.oneshot_score for c in plan.candidates])
    assert all(c.recovery_steps == 0 and c.score == c.oneshot_score for c in one_shot.candidates)


def test_faded_recovery_caps_the_layers_to_zero_then_removes_them_and_prunes_the_channels():
    """recovery_fade=0.5 of 4 steps: 2 steps with the candidate's gates under a cap 1 - n/2 (n steps done), then the
    layers removed, the channels pruned and 2 more steps; pure width (no layers to fade) trains all 4 after pruning."""
    net, x = make()
    seen = []
    batches, y = _labelled_batches(net, x, seen)
    names = ["layers.1.0", "layers.4.0"]

    class Spy(JointPruner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = []

        def _train(self, model, steps, after_step=None):
            caps = []

            def record(n):
                after_step(n)
                gates = resconv_plugin.gated_modules(model)
                caps.append([gates[name].gamma.item() for name in names])

            super()._train(model, steps, record if after_step else None)
            self.calls.append((steps, caps, sum(p.numel() for p in model.parameters())))

    pruner = Spy(net, x[:1], 0.3, calibration_inputs=x, calibration_targets=y, cost="flops",
                 recovery_batches=batches, recovery_steps=4, recovery_lr=0.05, recovery_fade=0.5)
    model = pruner.recover_faded(names, 0.25)
    (fade, caps, _), (rest, after, size) = pruner.calls
    assert (fade, rest) == (2, 2) and after == []
    assert caps[0] == pytest.approx([0.5, 0.5]) and caps[1] == [0.0, 0.0]  # trained up to the cap, clamped under it
    assert seen == [0, 1, 0, 1]  # the batches from their start in each phase
    # the result is the one-shot candidate's structure (layers gone, channels pruned at the ratio)
    oneshot = pruner.apply(resconv_plugin.pruning.SplitCandidate(0.5, names, 0.25, 0.0, 0.0))
    assert [p.shape for p in model.parameters()] == [p.shape for p in oneshot.parameters()]
    assert size == sum(p.numel() for p in oneshot.parameters())
    assert not any(name in resconv_plugin.gated_modules(model) for name in names)
    pruner.calls.clear()
    pruner.recover_faded([], 0.25)
    assert [c[0] for c in pruner.calls] == [4]
    # the plan scores a candidate with layers by its faded recovery (and pure width by plain recovery)
    plan = pruner.plan()
    depth = [c for c in plan.candidates if c.depth_names]
    assert depth and all(c.recovery_steps == 4 for c in plan.candidates)
    for c in depth:
        model = pruner.recover_faded(c.depth_names, c.channel_ratio)
        with torch.no_grad():
            expected = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
        assert c.score == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(recovery_fade=1.0), ValueError, r"recovery_fade must be a fraction in \[0, 1\), got 1.0"),
    (dict(recovery_fade=True), ValueError, r"recovery_fade must be a fraction in \[0, 1\), got True"),
    (dict(recovery_steps=-1), ValueError, "recovery_steps must be a non-negative int, got -1"),
    (dict(recovery_steps=5), ValueError, r"recovery_steps=5 needs recovery_batches"),
    (dict(recovery_steps=5, recovery_batches=iter([])), TypeError, "recovery_batches must be re-iterable"),
    (dict(recovery_steps=5, recovery_batches=[], recovery_lr=0), ValueError,
     "recovery_lr must be a positive number, got 0"),
])
def test_bad_recovery_arguments(kwargs, error, match):
    net, x = make()
    with pytest.raises(error, match=match):
        JointPruner(net, x[:1], 0.3, calibration_inputs=x, cost="flops", **kwargs)


def test_bad_recovery_batches_fail_when_drawn():
    net, x = make()
    for batches, error, match in (([], ValueError, "recovery_batches yielded no batch"),
                                  ([x[:4]], TypeError, r"must yield \(inputs, targets\) pairs, got Tensor")):
        pruner = JointPruner(net, x[:1], 0.3, calibration_inputs=x, cost="flops", depth_shares=(1.0,),
                             recovery_batches=batches, recovery_steps=2)
        with pytest.raises(error, match=match):
            pruner.plan()


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction=1.0), r"reduction must be in \(0, 1\)"),
    (dict(cost="watts"), "cost must be 'latency', 'flops' or a callable"),
    (dict(depth_shares=(0.5, 2.0)), r"depth_shares must be fractions in \[0, 1\]"),
])
def test_bad_arguments(kwargs, match):
    net, x = make()
    args = dict(reduction=0.3, cost="flops")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        JointPruner(net, x[:1], args.pop("reduction"), calibration_inputs=x, **args)
    with pytest.raises(ValueError, match="has no gates"):
        JointPruner(Chain(), x[:1], 0.3, calibration_inputs=x)
