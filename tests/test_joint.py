"""JointPlanner: one budget planned between depth (first) and width. Hand-built nets where one side is clearly
better (free to remove), a deterministic cost (FLOPs) so that nothing depends on timing."""

import pytest
import torch
from torch import nn

import resconv_plugin
from resconv_plugin.pruning import FixedSetImportance, JointPlan, JointPlanner, LayerPruner, PlanCandidate

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


def plan_of(net, x, reduction, **kwargs):
    kwargs.setdefault("importance", "removal")
    return JointPlanner(net, x[:1], reduction, calibration_inputs=x, cost=kwargs.pop("cost", "flops"), **kwargs)


def test_chooses_pure_depth_where_layers_are_free_to_remove():
    net, x = make(identity_layers=(1, 3, 5))
    plan = plan_of(net, x, 0.3).plan()
    best = plan.best
    assert best.kind == "depth" and best.channel_ratio == 0.0
    assert set(best.depth_names) <= {"layers.1.0", "layers.3.0", "layers.5.0"} and len(best.depth_names) == 2
    assert best.cost_rel <= 0.7  # the budget is met
    width = next(c for c in plan.candidates if c.kind == "width")
    assert width.channel_ratio > 0 and width.cost_rel <= 0.7
    assert best.score < width.score


def test_chooses_pure_width_where_channels_are_free_to_remove():
    net, x = make(dead_channels=(0, 3, 5, 6))
    planner = plan_of(net, x, 0.4)
    plan = planner.plan()
    best = plan.best
    assert best.kind == "width" and not best.depth_names and best.channel_ratio > 0 and best.cost_rel <= 0.6
    depth = next(c for c in plan.candidates if c.kind == "depth")
    assert depth.depth_names and best.score < depth.score
    pruned = planner.structure(best.depth_names, best.channel_ratio)  # the dead channels went: same outputs
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-4, atol=1e-5)


def test_depth_first_candidates_keep_the_depth_plans_most_important_gates():
    """The depth plan (ranked least important first), then the same plan with its 1 .. top_ups most important gates
    kept and channels meeting the rest, then pure width: each meets the budget."""
    net, x = make(identity_layers=(1, 3))
    planner = plan_of(net, x, 0.45)
    depth = planner.depth_plan()
    assert len(depth) == 3 and set(depth[:2]) == {"layers.1.0", "layers.3.0"}  # the free ones rank first
    found, unreachable = planner.candidates()
    assert not unreachable
    assert [(c.kind, c.depth_names) for c in found] == [("depth", depth), ("depth+width", depth[:2]),
                                                        ("depth+width", depth[:1]), ("width", [])]
    assert all(c.cost_rel <= 0.55 for c in found)
    assert [c.channel_ratio > 0 for c in found] == [False, True, True, True]
    one = JointPlanner(net, x[:1], 0.45, calibration_inputs=x, cost="flops", importance="removal", top_ups=1,
                       width=False)
    assert [c.kind for c in one.candidates()[0]] == ["depth", "depth+width"]


def test_the_plan_is_trained_at_its_final_widths():
    """build() prunes the channels of the converted model (gates kept, for the layers to fade out in training);
    removing the depth set from it gives the structure whose cost the plan measured."""
    net, x = make(identity_layers=(1, 3))
    planner = plan_of(net, x, 0.45)
    plan = planner.plan()
    mixed = next(c for c in plan.candidates if c.kind == "depth+width")
    built = planner.build(mixed.depth_names, mixed.channel_ratio)
    assert set(resconv_plugin.gated_modules(built)) == set(resconv_plugin.gated_modules(net))
    from resconv_plugin.pruning.planner import remove_gates

    remove_gates(built, mixed.depth_names)
    assert planner.cost_rel(built) == pytest.approx(mixed.cost_rel)
    again = planner.build(mixed.depth_names, mixed.channel_ratio)  # the same ratio, the same structure
    assert [m.out_channels for m in again.modules() if isinstance(m, nn.Conv2d)] == \
        [m.out_channels for m in planner.build(mixed.depth_names, mixed.channel_ratio).modules()
         if isinstance(m, nn.Conv2d)]


def test_budget_met_within_one_channel_group():
    """The channel ratio found is the smallest that meets the budget: one channel group less would miss it."""
    net, x = make()
    planner = plan_of(net, x, 0.35)
    best = planner.meet([])
    assert best.kind == "width" and best.cost_rel <= 0.65
    kept = [m.out_channels for m in planner.structure([], best.channel_ratio).modules() if isinstance(m, nn.Conv2d)][0]
    assert kept < C
    one_less = planner.structure([], (C - kept - 1) / C)  # one channel (this net's group) fewer pruned
    assert [m.out_channels for m in one_less.modules() if isinstance(m, nn.Conv2d)][0] == kept + 1
    assert planner.cost_rel(one_less) > 0.65


def convs(model):
    """A cost only layer removal lowers: the number of convolutions of the deployed model."""
    return float(sum(isinstance(m, nn.Conv2d) for m in model.modules()))


def test_candidates_that_cannot_reach_the_budget_are_listed_not_fatal():
    """Cost = number of convs (7: stem + 6 layers): channel pruning never lowers it. The depth plan (by FLOPs, two
    layers: 5 / 7 = 0.714) meets 0.75; kept one more layer (6 / 7) no channel ratio does, nor pure width."""
    net, x = make()
    planner = plan_of(net, x, 0.25, cost=convs)
    plan = planner.plan()
    assert plan.unreachable == ["depth+width 1", "width"]
    assert [(c.kind, len(c.depth_names), c.channel_ratio) for c in plan.candidates] == [("depth", 2, 0.0)]
    assert plan.best.cost_rel == pytest.approx(5 / 7)
    assert len(planner.last_search.tries) == 13 and not planner.last_search.met  # ratio 0, then 12 bisection steps
    with pytest.raises(ValueError, match="no candidate reaches 0.050 of the cost"):
        plan_of(net, x, 0.95, cost=convs).plan()  # even 6 layers leave 1 / 7


def test_a_score_callable_ranks_the_candidates_built_as_they_are_trained():
    """score(candidate, model) gets each candidate's build() (gates kept, channels pruned) and decides."""
    net, x = make(identity_layers=(1, 3, 5))
    seen = []

    def score(candidate, model):
        seen.append((candidate.kind, len(resconv_plugin.gated_modules(model))))
        return {"depth": 2.0, "depth+width": 1.0, "width": 3.0}[candidate.kind]

    plan = plan_of(net, x, 0.3, score=score).plan()
    assert plan.best.kind == "depth+width" and all(c.score is not None for c in plan.candidates)
    assert [k for k, _ in seen] == [c.kind for c in plan.candidates] and all(n == 6 for _, n in seen)


def test_a_candidate_whose_score_is_not_finite_never_wins():
    """A NaN score (recovery that blew up) ranks last wherever it stands in the list; ties go to more depth."""
    def cand(layers, score):
        return PlanCandidate("depth" if layers else "width", [f"l{i}" for i in range(layers)], 0.0, 0.6, score)

    for scores in ([float("nan"), 0.9, 0.4], [0.4, float("nan"), 0.9], [0.9, 0.4, float("inf")]):
        plan = JointPlan(target_rel=0.6, candidates=[cand(i, x) for i, x in enumerate(scores)])
        assert plan.best.score == 0.4
    plan = JointPlan(target_rel=0.6, candidates=[cand(0, 0.5), cand(2, 0.5), cand(1, float("nan"))])
    assert len(plan.best.depth_names) == 2
    only = JointPlan(target_rel=0.6, candidates=[cand(0, float("nan"))])
    assert only.best.kind == "width"  # nothing better to choose


def test_fixed_set_importance_trains_a_chosen_set():
    net, x = make()
    names = ["layers.0.0", "layers.4.0"]
    pruner = LayerPruner(net, x[:1], importance=FixedSetImportance(names), gate_ratio=2 / 6)
    assert sorted(pruner.select()) == names
    with pytest.raises(ValueError, match="names gates the pruner does not have"):
        LayerPruner(net, x[:1], importance=FixedSetImportance(["nope"]), gate_ratio=0.3).select()
    with pytest.raises(TypeError, match="names must be a sequence of gate names"):
        FixedSetImportance("layers.0.0")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(reduction=1.0), ValueError, r"reduction must be in \(0, 1\), got 1.0"),
    (dict(reduction=0.3, cost="energy"), ValueError, "cost must be 'latency', 'flops', a LatencyCost or a callable"),
    (dict(reduction=0.3, top_ups=-1), ValueError, "top_ups must be an int >= 0, got -1"),
    (dict(reduction=0.3, score="loss"), TypeError, "score must be a callable"),
    (dict(reduction=0.3, calibration_targets=[1, 2]), TypeError, "calibration_targets must be a tensor"),
])
def test_bad_arguments(kwargs, error, match):
    net, x = make()
    with pytest.raises(error, match=match):
        JointPlanner(net, x[:1], kwargs.pop("reduction"), calibration_inputs=x, **kwargs)
    with pytest.raises(ValueError, match="has no gates: call resconv_plugin.convert"):
        JointPlanner(Chain(), x[:1], 0.3, calibration_inputs=x)


def test_the_joint_pruner_of_earlier_releases_says_what_replaced_it():
    with pytest.raises(AttributeError, match="JointPruner was replaced by JointPlanner"):
        resconv_plugin.pruning.JointPruner


def test_a_depth_set_that_meets_the_budget_on_its_confirmed_timing_stays_depth():
    """Latency is noisy: a depth set's first timing reads over the budget, the bisection's three timings of it at
    ratio 0 meet it. The candidate keeps its layers and no channels, and says so: kind "depth", not "depth+width"
    (cifar_resnet20 at 0.6 once listed four blocks at ratio 0 as "depth+width")."""
    net, x = make()
    planner = plan_of(net, x, 0.4)
    readings = iter([0.61] + [0.59] * 10)
    planner.cost_rel = lambda model: next(readings)
    found = planner.meet(["layers.0.0", "layers.1.0"])
    assert (found.kind, found.channel_ratio, found.cost_rel) == ("depth", 0.0, 0.59)
