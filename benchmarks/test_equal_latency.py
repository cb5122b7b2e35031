"""benchmarks/equal_latency.py's summary: the curve read-off, advantage_pt, the paper's claim and the schedule guard,
on hand-computed rows (the README's verdict table comes from these numbers). The benchmark's own tests: collected with
the suite (``testpaths``), they import the benchmark beside them and nothing from ``tests/``."""

import pytest
import torch

import equal_latency
from resconv_plugin.testing import random_image_data


@pytest.fixture(scope="module")
def bench():
    return equal_latency


def row(method, seed, target, latency, top1, flops=0.5):
    return {"arch": "a", "method": method, "seed": seed, "target": target, "latency_rel": latency, "top1": top1,
            "flops_rel": flops}


def test_curve_reads_linearly_between_points_and_none_below(bench):
    points = [(0.5, 89.0), (1.0, 90.0)]
    assert bench.curve_at(points, 0.6) == pytest.approx(89.2)
    assert bench.curve_at(points, 0.5) == 89.0
    assert bench.curve_at(points, 0.49) is None
    assert bench.curve_at([(1.0, 90.0), (0.5, 89.0)], 0.75) == pytest.approx(89.5)  # order does not matter


def test_advantage_is_best_depth_mean_minus_best_channel_mean(bench):
    rows = [row("depth", 0, 0.6, 0.5, 89.0), row("depth", 1, 0.6, 0.5, 88.0),
            row("slim_r8", 0, 0.6, 0.6, 88.0), row("slim_r8", 1, 0.6, 0.6, 89.0),
            row("groupnorm_r8", 0, 0.6, 0.6, 80.0), row("groupnorm_r8", 1, 0.6, 0.6, 80.0)]
    summary = bench.summarise(rows, {"a": 90.0}, [0.8, 0.6, 0.55, 0.45])
    adv = summary["archs"]["a"]["advantage_pt"]
    # 0.6: depth seeds 89 + 1 * 0.1 / 0.5 = 89.2 and 88 + 2 * 0.2 = 88.4 -> 88.8; slim 88.5 (groupnorm 80)
    assert adv["0.6"] == pytest.approx(0.3)
    # 0.8: depth 89.6 / 89.2 -> 89.4; slim 88 + 2 * 0.5 = 89 / 89 + 0.5 = 89.5 -> 89.25
    assert adv["0.8"] == pytest.approx(0.15)
    assert adv["0.55"] is None  # no channel-only point at or below 0.55
    assert adv["0.45"] is None  # nothing reaches it
    assert len(summary["archs"]["a"]["points"]) == 6 and summary["archs"]["a"]["baseline_top1"] == 90.0
    assert summary["archs"]["a"]["notes"] == {  # every null says why, nothing else has a note
        "0.55": "null: no channel-only method has a point at or below 0.55 of the latency on every seed",
        "0.45": "null: no depth-based and no channel-only method has a point at or below 0.45 of the latency on "
                "every seed"}


def test_a_method_counts_only_where_every_seed_reaches_the_latency(bench):
    rows = [row("depth", 0, 0.6, 0.5, 89.0), row("depth", 1, 0.6, 0.7, 89.0),
            row("slim", 0, 0.6, 0.6, 88.0), row("slim", 1, 0.6, 0.6, 88.0)]
    adv = bench.summarise(rows, {"a": 90.0}, [0.6])["archs"]["a"]["advantage_pt"]
    assert adv["0.6"] is None  # seed 1 of depth stops at 0.7: no mean over both seeds at 0.6


def test_paper_claim_is_the_largest_flops_reduction_within_0_3_pt(bench):
    rows = [row("depth", 0, 0.8, 0.8, 89.9, flops=0.7), row("depth", 1, 0.8, 0.8, 89.6, flops=0.7),
            row("depth", 0, 0.6, 0.6, 89.8, flops=0.4), row("depth", 1, 0.6, 0.6, 89.4, flops=0.4),
            row("slim", 0, 0.8, 0.8, 89.0, flops=0.6)]
    claim = bench.paper_claim(rows, 90.0)
    # depth 0.8: mean change -0.25 (kept); 0.6: -0.4 (too much)
    assert claim["depth"]["target"] == 0.8 and claim["depth"]["seeds"] == [0, 1]
    assert claim["depth"]["flops_reduction"] == pytest.approx(0.3)
    assert claim["depth"]["top1_change"] == pytest.approx(-0.25)
    assert claim["slim"] is None


def test_rows_of_another_schedule_are_refused(bench):
    schedule = {"train_subset": 20000, "sparsity_epochs": 3, "finetune_epochs": 3}
    bench.check_schedule({"key": "k", **schedule}, schedule)
    with pytest.raises(ValueError, match="row k was trained with .*'train_subset': 10000.* this run asks for"):
        bench.check_schedule({"key": "k", **schedule, "train_subset": 10000}, schedule)
    with pytest.raises(ValueError, match="row k was trained with"):
        bench.check_schedule({"key": "k"}, schedule)


def test_depth_block_short_spends_the_same_total_epochs_with_one_in_sparsity_training(bench):
    schedule = {"train_subset": 20000, "sparsity_epochs": 3, "finetune_epochs": 3, "finetune_lr": 0.02}
    short = bench.method_schedule("depth_block_short", schedule)
    assert short == {"train_subset": 20000, "sparsity_epochs": 1, "finetune_epochs": 5, "finetune_lr": 0.02}
    assert bench.method_schedule("depth_block", schedule) == schedule
    assert bench.method_schedule("meta_taylor", schedule) == schedule
    tiny = bench.method_schedule("depth_block_short", dict(schedule, sparsity_epochs=0, finetune_epochs=0))
    assert (tiny["sparsity_epochs"], tiny["finetune_epochs"]) == (0, 0)
    # its rows are checked against its own schedule: a depth_block row of the run's schedule is not one of them
    bench.check_schedule({"key": "k", **short}, short)
    with pytest.raises(ValueError, match="row k was trained with"):
        bench.check_schedule({"key": "k", **schedule}, short)


def test_default_and_joint_rows_run_the_commands_recipe_and_depth_rows_keep_the_former_defaults(bench):
    import timm

    schedule = {"train_subset": 20000, "sparsity_epochs": 3, "finetune_epochs": 3, "finetune_lr": 0.02}
    resnet = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    assert bench.method_schedule("default", schedule, resnet) == dict(schedule, sparsity_epochs=1, finetune_epochs=5)
    plain = timm.create_model("cifar_plain20", num_classes=10, in_chans=1)
    assert bench.method_schedule("default", schedule, plain) == schedule  # layer gates: 3 + 3
    assert bench.DEPTH_SETTINGS["default"] == {}  # no recipe option at all
    # the joint planner takes the default recipe too, with its epochs
    assert bench.DEPTH_SETTINGS["joint"] == {"channel_pruning": "auto"}
    assert bench.method_schedule("joint", schedule, resnet) == dict(schedule, sparsity_epochs=1, finetune_epochs=5)
    # the rows of "depth" were run with the command's former defaults: they keep them
    assert bench.DEPTH_SETTINGS["depth"] == {"level": "layer", "importance": "removal-iterative"}


def test_depth_block_oneshot_removes_blocks_before_training_and_fine_tunes_every_epoch(bench):
    schedule = {"train_subset": 20000, "sparsity_epochs": 3, "finetune_epochs": 3, "finetune_lr": 0.02}
    oneshot = bench.method_schedule("depth_block_oneshot", schedule)
    assert oneshot == {"train_subset": 20000, "sparsity_epochs": 0, "finetune_epochs": 6, "finetune_lr": 0.02}
    assert bench.DEPTH_SETTINGS["depth_block_oneshot"] == {"level": "block", "importance": "removal-iterative"}
    assert "depth_block_oneshot" in bench.DEPTH_METHODS


def test_matched_pairs_are_the_rows_means_per_target(bench):
    rows = [row("depth", 0, 0.45, 0.44, 88.0, 0.2), row("depth", 1, 0.45, 0.45, 86.0, 0.3),
            row("meta_taylor", 0, 0.45, 0.47, 84.0), row("meta_taylor", 1, 0.45, 0.48, 83.0)]
    summary = bench.summarise(rows, {"a": 90.0}, [0.45])["archs"]["a"]
    assert summary["advantage_pt"] == {"0.45": None}  # meta_taylor never at or below 0.45
    m = summary["matched"]["0.45"]
    assert m["depth"] == {"seeds": [0, 1], "top1": 87.0, "top1_min": 86.0, "top1_max": 88.0,
                          "latency_rel": pytest.approx(0.445), "flops_rel": pytest.approx(0.25)}
    assert m["meta_taylor"]["top1"] == 83.5 and m["meta_taylor"]["latency_rel"] == pytest.approx(0.475)


def test_retimed_verdict_uses_only_methods_whose_every_row_was_retimed(bench):
    rows = [dict(row("depth", s, 0.6, 0.6, 89.0), key=f"d{s}") for s in (0, 1)] + \
           [dict(row("meta_taylor", s, 0.6, 0.62, 88.0), key=f"m{s}") for s in (0, 1)] + \
           [dict(row("slim", s, 0.6, 0.5, 89.5), key=f"s{s}") for s in (0, 1)]
    # retimed: depth stays at 0.6, meta_taylor now at 0.5; slim's structure could not be rebuilt (one row missing)
    retimed = {"d0": 0.6, "d1": 0.6, "m0": 0.5, "m1": 0.5, "s0": 0.5}
    arch = bench.summarise(rows, {"a": 90.0}, [0.6], retimed)["archs"]["a"]
    assert arch["advantage_pt"]["0.6"] == pytest.approx(89.0 - (89.5 + 0.5 * 0.1 / 0.5))  # as run: slim best
    assert arch["retimed"]["methods"] == ["depth", "meta_taylor"]
    # retimed: meta_taylor 88 + 2 * 0.1 / 0.5 = 88.4 at 0.6; depth 89.0
    assert arch["retimed"]["advantage_pt"]["0.6"] == pytest.approx(0.6)
    assert arch["retimed"]["matched"]["0.6"]["meta_taylor"]["latency_rel"] == pytest.approx(0.5)
    assert "retimed" not in bench.summarise(rows, {"a": 90.0}, [0.6])["archs"]["a"]


def test_rebuild_reproduces_depth_and_meta_structures_and_refuses_the_rest(bench):
    import copy

    import timm

    import resconv_plugin
    from resconv_plugin.data import calibration_batch

    torch.manual_seed(0)
    base = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    data = random_image_data(300)
    flops = lambda m: resconv_plugin.count_flops(resconv_plugin.deployed(m), bench.EXAMPLE).total
    removed = ["layer1.0.conv1", "layer2.1.conv2", "layer3.2.conv1"]
    pruned = copy.deepcopy(base)
    resconv_plugin.convert(pruned, bench.EXAMPLE)
    with torch.no_grad():
        for name in removed:
            resconv_plugin.gated_modules(pruned)[name].gamma.zero_()
    resconv_plugin.LayerPruner(pruned, bench.EXAMPLE, threshold=0.0).step()
    depth = {"method": "depth", "removed": removed, "seed": 0, "flops_rel": flops(pruned) / flops(base)}
    assert depth["flops_rel"] < 0.9
    plain = bench.rebuild(depth, base, data)
    assert flops(plain) == flops(pruned) and sum(p.numel() for p in plain.parameters()) < sum(
        p.numel() for p in base.parameters())
    # depth_block: block gates (the same names would not exist at the layer level)
    blocks = copy.deepcopy(base)
    resconv_plugin.convert(blocks, bench.EXAMPLE, level="block")
    with torch.no_grad():
        for name in ("layer1.1", "layer3.2"):
            resconv_plugin.gated_modules(blocks)[name].gamma.zero_()
    assert resconv_plugin.LayerPruner(blocks, bench.EXAMPLE, threshold=0.0).step() == ["layer1.1", "layer3.2"]
    block_row = {"method": "depth_block", "removed": ["layer1.1", "layer3.2"], "seed": 0,
                 "flops_rel": flops(blocks) / flops(base)}
    assert flops(bench.rebuild(block_row, base, data)) == flops(blocks) < flops(plain)
    meta = bench.prune_channels(base, "meta_taylor", 0.3, calibration_batch(data, 256, seed=1))
    record = {"method": "meta_taylor", "channel_ratio": 0.3, "seed": 1, "flops_rel": flops(meta) / flops(base)}
    assert flops(bench.rebuild(record, base, data)) == flops(meta)
    assert bench.rebuild(dict(record, flops_rel=record["flops_rel"] + 0.01), base, data) is None  # not reproduced
    for method in ("slim", "groupnorm", "joint"):  # rows written before rows recorded their structure
        assert bench.rebuild({"method": method, "seed": 0, "flops_rel": 0.5}, base, data) is None
    # a structure the training decided (joint: layers removed, then channels): recorded, rebuilt to its shapes
    joint = bench.prune_channels(pruned.eval(), "meta_magnitude", 0.3, calibration_batch(data, 256, seed=0))
    deployed_joint = resconv_plugin.deployed(joint)
    row = {"method": "joint", "seed": 0, "flops_rel": flops(joint) / flops(base),
           "structure": bench.describe(deployed_joint)}
    rebuilt = bench.rebuild(row, base, data)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in deployed_joint.parameters()]
    assert flops(rebuilt) == flops(joint) < flops(pruned)
    assert all(torch.isfinite(p).all() for p in rebuilt.parameters())  # placeholders, not uninitialised memory
    assert torch.isfinite(rebuilt(bench.EXAMPLE)).all()
    # retime: every rebuildable row timed with the baseline, once per pass; the others listed
    rows = [dict(depth, arch="a", key="d"), dict(record, arch="a", key="m"),
            {"arch": "a", "key": "s", "method": "slim", "seed": 0, "flops_rel": 0.5}]
    retimed, runs, skipped = bench.retime(rows, {"a": base}, data, repeats=2, passes=3)
    assert sorted(retimed) == ["d", "m"] and skipped == ["s"]
    assert all(len(runs[k]) == 3 and retimed[k] == sorted(runs[k])[1] for k in retimed)


def test_a_retimed_value_counts_only_for_the_row_it_measured(bench):
    saved = {"latency_rel": {"a": 0.5, "b": 0.6, "gone": 0.7}, "flops_rel": {"a": 0.25, "b": 0.3, "gone": 0.1}}
    records = [{"key": "a", "flops_rel": 0.25}, {"key": "b", "flops_rel": 0.31}, {"key": "new", "flops_rel": 0.2}]
    assert bench.current_retimes(saved, records) == ({"a": 0.5}, ["b"])  # b was rerun with another structure
    assert bench.current_retimes({"latency_rel": {"a": 0.5}}, records) == ({}, ["a"])  # a file without FLOPs


def test_retimes_combine_to_each_rows_median_over_the_retimes_that_measured_it(bench):
    records = [{"key": "a", "flops_rel": 0.25}, {"key": "b", "flops_rel": 0.3}, {"key": "c", "flops_rel": 0.4}]
    retimes = [  # given out of order: combined oldest first
        {"finished": "20261130T120000Z", "latency_rel": {"a": 0.52, "b": 0.6}, "flops_rel": {"a": 0.25, "b": 0.3}},
        {"finished": "20261130T070000Z", "latency_rel": {"a": 0.40, "b": 0.7, "c": 0.5},
         "flops_rel": {"a": 0.25, "b": 0.3, "c": 0.41}},  # c measured before it was rerun with another structure
        {"finished": "20261130T100000Z", "latency_rel": {"a": 0.45}, "flops_rel": {"a": 0.25}}]
    retimed, each, stale = bench.combined_retimes(retimes, records)
    assert each == {"a": [0.40, 0.45, 0.52], "b": [0.7, 0.6]}
    assert retimed == {"a": pytest.approx(0.45), "b": pytest.approx(0.65)} and stale == ["c"]
    assert bench.combined_retimes([], records) == ({}, {}, [])
    rows = [dict(row("depth", 0, 0.6, 0.6, 89.0), key="a"), dict(row("meta_taylor", 0, 0.6, 0.6, 88.0), key="b")]
    arch = bench.summarise(rows, {"a": 90.0}, [0.6], retimed, retimes=each)["archs"]["a"]
    assert arch["retimed"]["retimes"] == each
    assert [p["latency_rel"] for p in arch["retimed"]["points"]] == [pytest.approx(0.45), pytest.approx(0.65)]


def test_retimes_of_another_cpu_are_not_pooled(bench):
    """Latency ratios are the machine's: the verdict uses the newest retime's CPU and only its retimes."""
    records = [{"key": "a", "flops_rel": 0.25}]
    intel, amd = {"cpu": "Intel(R) Xeon(R) Processor"}, {"cpu": "AMD EPYC"}
    retimes = [{"finished": finished, "latency_rel": {"a": value}, "flops_rel": {"a": 0.25}, "environment": cpu}
               for finished, value, cpu in [("20261130T163000Z", 0.60, intel), ("20261130T191700Z", 0.50, amd),
                                            ("20261130T070000Z", 0.62, intel), ("20261130T191900Z", 0.52, amd)]]
    assert bench.retime_cpu(retimes) == "AMD EPYC" and bench.retime_cpu([]) is None
    retimed, each, _ = bench.combined_retimes(retimes, records, "AMD EPYC")
    assert each == {"a": [0.50, 0.52]} and retimed == {"a": pytest.approx(0.51)}
    assert bench.combined_retimes(retimes, records, intel["cpu"])[1] == {"a": [0.62, 0.60]}
    assert bench.combined_retimes(retimes, records)[1] == {"a": [0.62, 0.60, 0.50, 0.52]}  # no cpu: every retime
    rows = [dict(row("depth", 0, 0.6, 0.6, 89.0), key="a")]
    arch = bench.summarise(rows, {"a": 90.0}, [0.6], retimed, retimes=each, cpu="AMD EPYC")["archs"]["a"]
    assert arch["retimed"]["cpu"] == "AMD EPYC"


def test_a_seed_run_at_one_target_only_has_no_curve(bench):
    rows = [row("depth", s, t, t, 90.0 - 10 * (1 - t)) for s in (0, 1) for t in (0.8, 0.6)] + \
           [row("slim", s, t, t, 90.0 - 20 * (1 - t)) for s in (0, 1) for t in (0.8, 0.6)] + \
           [row("depth", 2, 0.6, 0.65, 80.0)]  # a third seed at 0.6 only, landing above 0.6
    arch = bench.summarise(rows, {"a": 90.0}, [0.8, 0.6])["archs"]["a"]
    assert arch["advantage_pt"]["0.6"] == pytest.approx(86.0 - 82.0)  # seeds 0 and 1 only
    assert arch["matched"]["0.6"]["depth"]["seeds"] == [0, 1, 2]  # the like-for-like mean keeps it


def test_a_row_the_pipeline_refused_says_why_in_its_targets_note(bench):
    rows = [row("depth", 0, 0.6, 0.6, 89.0), row("slim", 0, 0.6, 0.6, 88.0), row("slim", 0, 0.35, 0.35, 70.0)]
    why = "cifar_x: latency_reduction=0.65 is unreachable: removing every prunable gate (52) removes at most 0.584"
    not_run = {"a-depth-t0.35-s0": why, "b-depth-t0.35-s0": "another arch's"}
    arch = bench.summarise(rows, {"a": 90.0}, [0.6, 0.35], not_run=not_run)["archs"]["a"]
    assert arch["advantage_pt"] == {"0.6": pytest.approx(1.0), "0.35": None}
    assert arch["not_run"] == {"a-depth-t0.35-s0": why}  # only this arch's
    assert arch["notes"] == {"0.35": "null: no depth-based method has a point at or below 0.35 of the latency on "
                                     f"every seed; depth seed 0 not run: {why}"}
    assert "not_run" not in bench.summarise(rows, {"a": 90.0}, [0.6, 0.35])["archs"]["a"]


def test_joint_proxy_pairs_each_candidate_with_the_trained_row_of_its_structure(bench):
    """Candidates of one joint row: the chosen one is the joint row, the blocks-only depth plan the default row
    (same blocks), pure width the meta_taylor row; a top-up without a trained twin stays unknown. Scores 0.15 /
    0.18 / 0.21 against top-1 93.9 / 93.6 / 93.5: all 3 pairs concordant; swapping two top-1s makes one
    discordant."""
    def joint(top1, default, width):
        plan = {"best": {"depth_names": ["b"], "channel_ratio": 0.2}, "candidates": [
            {"kind": "depth", "depth_names": ["a", "b"], "channel_ratio": 0.0, "score": 0.18},
            {"kind": "depth+width", "depth_names": ["a"], "channel_ratio": 0.1, "score": 0.16},
            {"kind": "depth+width", "depth_names": ["b"], "channel_ratio": 0.2, "score": 0.15},
            {"kind": "width", "depth_names": [], "channel_ratio": 0.4, "score": 0.21}]}
        rows = [dict(row("joint", 0, 0.6, 0.6, top1), key="a-joint-t0.6-s0", joint_plan=plan),
                dict(row("default", 0, 0.6, 0.6, default), key="a-default-t0.6-s0", removed=["b", "a"]),
                dict(row("meta_taylor", 0, 0.6, 0.6, width), key="a-meta_taylor-t0.6-s0")]
        return bench.joint_proxy(rows)

    proxy = joint(93.9, 93.6, 93.5)
    assert [c["trained_by"] for c in proxy["rows"][0]["candidates"]] == ["default", None, "joint", "meta_taylor"]
    assert (proxy["pairs"], proxy["concordant"], proxy["tau"]) == (3, 3, 1.0)
    proxy = joint(93.9, 93.4, 93.5)  # the depth plan (0.18) trained worse than width (0.21)
    assert (proxy["pairs"], proxy["concordant"]) == (3, 2) and proxy["tau"] == pytest.approx(1 / 3)
