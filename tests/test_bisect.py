"""bisect_ratio, the one channel-ratio search (joint planner, benchmarks), and JointPlanner.meet on a
mocked clock: a latency that is the FLOPs plus timing noise with outliers, so that nothing depends on this
machine's timings."""

import itertools

import pytest
import torch
from torch import nn

import resconv_plugin
from resconv_plugin.pruning import JointPlanner, bisect_ratio


class Pruned(nn.Module):
    """Stands for a model pruned at ``ratio``."""

    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio


def noisy(truth, outlier=0.1, small=0.004):
    """A clock: ``truth(model)`` plus a small wobble, and every third measurement an outlier of +-``outlier``
    (alternating), the way a timing next to another job jumps."""
    counter = itertools.count()

    def cost(model):
        k = next(counter)
        if k % 3 == 2:
            return truth(model) + (outlier if (k // 3) % 2 == 0 else -outlier)
        return truth(model) + (small if k % 2 else -small)

    return cost


def linear(model):
    return 1.0 - 0.8 * model.ratio


@pytest.mark.parametrize("target", [0.8, 0.6, 0.45, 0.35])
def test_lands_in_the_band_with_a_deterministic_cost(target):
    search = bisect_ratio(Pruned, linear, target, tolerance=0.02, confirm=1)
    assert search.met and target - 0.02 <= search.cost_rel <= target
    assert search.cost_rel == linear(search.model)
    assert search.tries[0][0] == 0.0 and all(n == 1 for _, _, n in search.tries)


@pytest.mark.parametrize("target", [0.8, 0.6, 0.45, 0.35])
@pytest.mark.parametrize("outlier", [0.1, 0.2])
def test_a_noisy_clock_read_at_the_median_lands_within_0_03_of_the_target(target, outlier):
    search = bisect_ratio(Pruned, noisy(linear, outlier=outlier), target, tolerance=0.02, confirm=3)
    assert search.met
    assert abs(linear(search.model) - target) <= 0.03  # what a retime (the true cost) would say
    assert all(n == 3 for _, _, n in search.tries)  # every try read at the median of three


def test_a_single_reading_of_the_same_clock_misses():
    """The same clock read once per try: an outlier steers the bisection away (what the median prevents)."""
    misses = [abs(linear(bisect_ratio(Pruned, noisy(linear, outlier=0.15), t, tolerance=0.02, confirm=1).model) - t)
              for t in (0.8, 0.6, 0.45, 0.35)]
    assert max(misses) > 0.03


def test_ratio_zero_first_and_the_cheapest_when_unreachable():
    search = bisect_ratio(Pruned, linear, 1.2, tolerance=0.02, confirm=1)  # the unpruned model meets it
    assert search.met and search.ratio == 0.0 and len(search.tries) == 1
    search = bisect_ratio(Pruned, linear, 0.1, tolerance=0.02, confirm=1, iterations=5)  # 1 - 0.8 * 0.95 = 0.24
    assert not search.met and search.ratio == max(r for r, _, _ in search.tries) and len(search.tries) == 6


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=0), "target must be a positive cost, got 0"),
    (dict(target=0.5, tolerance=0.6), r"tolerance must be in \(0, target=0.5\), got 0.6"),
    (dict(target=0.5, max_ratio=1.0), r"max_ratio must be in \(0, 1\), got 1.0"),
    (dict(target=0.5, confirm=0), "confirm must be a positive int, got 0"),
    (dict(target=0.5, iterations=2.5), "iterations must be a positive int, got 2.5"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bisect_ratio(Pruned, linear, **kwargs)


class Wide(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_joint_meet_on_a_mocked_clock_lands_within_0_03():
    """``JointPlanner.meet`` with ``cost="latency"``: the clock is the deployed model's FLOPs (its true cost) with
    the outliers above; the ratio it returns costs within 0.03 of the target when measured without noise."""
    torch.manual_seed(0)
    net = Wide(64).eval()  # wide enough that one channel moves the FLOPs by less than the tolerance
    x = torch.randn(8, 1, 10, 10)
    resconv_plugin.convert(net, x[:1])

    def flops(plain):
        return resconv_plugin.count_flops(plain, x[:1]).total

    base = flops(resconv_plugin.deployed(net))
    planner = JointPlanner(net, x[:1], 0.4, calibration_inputs=x, cost="latency")
    # the mocked clock: the deployed model's FLOPs relative to the baseline's, with a wobble and outliers
    planner.cost_rel = noisy(lambda model: flops(resconv_plugin.deployed(model)) / base, outlier=0.1)
    found = planner.meet([])
    truth = flops(resconv_plugin.deployed(planner.structure([], found.channel_ratio))) / base
    assert found.kind == "width" and found.channel_ratio > 0 and abs(truth - 0.6) <= 0.03
    assert all(n == 3 for _, _, n in planner.last_search.tries)
