"""The equal-latency verdict: depth pruning (the library's defaults, and with block gates), the joint depth + width
pruner, and torch-pruning's channel pruners, each pruned to the same measured CPU latency, from the same converged
baseline, with the same epochs, two seeds.

Per architecture (``cifar_resnet20``, ``cifar_resnet56``; baselines from ``benchmarks/baselines/``, trained with
``python benchmarks/baselines/train.py --arch ARCH``; an architecture whose baseline file is missing is skipped with
a note), latency target t (fraction of the deployed baseline's batch-1 CPU latency) and seed:
* ``default``: ``resconv_plugin.workflow.compress`` with ``latency_reduction = 1 - t`` and no recipe option at all:
  the command's measured-best defaults (``resconv_plugin.workflow.defaults``; on these ResNets block gates,
  magnitude, 1 epoch of sparsity training and 5 of fine-tuning: the same total as --sparsity-epochs +
  --finetune-epochs in the grid, 3 + 3; rows record the split they ran).
* ``depth``: the same with the command's defaults before the ``default`` recipe (layer gates, importance
  removal-iterative, distillation from the baseline): --sparsity-epochs, removal, --finetune-epochs, fusion.
* ``joint``: ``default`` with ``channel_pruning="auto"``: the joint planner (``JointPlanner``: the default recipe's
  depth plan, the same plan with its most important blocks kept and channels topped up, pure width with Taylor
  channels; each scored after its short distilled training) and its choice trained at its final widths, with the
  default recipe's epochs. Rows of the split-share planner it replaced are in git history (before commit
  "Replace JointPruner with a depth-first JointPlanner").
* ``depth_block``: the same as ``depth`` with ``level="block"`` (one gate per residual block with an identity
  shortcut instead of one per conv) and ``importance="magnitude"``, the block setting the depth ablation
  (``ablation_depth.md``) found best: at its 0.5 FLOPs budget it kept -1.95 pt (two seeds) at 0.48 of the latency,
  where layer gates with removal-iterative kept -2.06 at 0.60.
* ``depth_block_short``: ``depth_block`` with one epoch of sparsity training and the rest of the same total epochs
  fine-tuning (--sparsity-epochs 3 --finetune-epochs 3: 1 + 5; meta_* train all their epochs after pruning).
* ``depth_block_oneshot``: block gates removed one-shot from the baseline, no sparsity training (the command's
  default importance, removal-iterative: the block whose removal costs least on the calibration batch, re-measured
  after each removal, until the latency budget is met), then all of the run's epochs fine-tuning (0 + 6, as
  meta_* prune first and train all their epochs).
* ``slim`` / ``groupnorm``: torch-pruning's ``BNScalePruner`` (``BNScaleImportance``) / ``GroupNormPruner``
  (``GroupMagnitudeImportance``) regularising for --sparsity-epochs, then channels pruned (global) with the
  pruning ratio bisected until the deployed model's measured latency lies within 0.02 below the depth row's measured
  latency (same arch, target, seed; the nominal target when that row is not there yet; rows before commit 8a30a67
  accepted 0.02 either side; each try is timed in turns with the depth row's rebuilt structure, not the baseline,
  in rows that record ``latency_vs_depth``: that row / its depth row, timed in turns at the end), then
  --finetune-epochs.
* ``meta_taylor`` / ``meta_magnitude``: ``MetaPruner`` with ``GroupTaylorImportance`` (gradients of one
  calibration batch) / ``GroupMagnitudeImportance``, pruned first (bisected on latency as above), then
  --sparsity-epochs + --finetune-epochs of training: the same total epochs.
Channel methods run with default rounding and with ``round_to=8`` (method name suffix ``_r8``); every channel method
is distilled from the baseline like depth (alpha 0.5, T 4). Training: SGD momentum 0.9, cosine, weight decay 5e-4,
batch 128, on --train-subset training images, at lr 0.02 before pruning (depth's sparsity training, slim / groupnorm
regularised) and at --finetune-lr after it (default: the command's --finetune-lr default; rows record it; rows
without it were trained at 0.02); calibration: 256 training images.

Figures: top-1 on the full Fashion-MNIST test set; FLOPs of the deployed model (fvcore, resconv_plugin handles,
batch 1); latency_rel = median batch-1 CPU latency of the deployed row model / the deployed baseline, timed in turns
(--repeats rounds, --threads threads) right after the row finished; channel rows keep every try of the bisection
(``bisection``: [ratio, latency_rel]), depth rows the pruner's measured check of its latency budget (``latency_fit``),
every row the divergence guard's restarts (``restarts``; rows written before the guard's warm-up restart lack it).
Rows are kept one JSON file each under benchmarks/results/equal_latency_rows/ (commit them): the same command resumes at
the next row, in a later session too. The summary (``equal_latency_summary.json``): per arch, every point, and
advantage_pt per target = best depth-based method's mean top-1 over seeds minus the best channel-only method's, each
read off its method's top-1-vs-latency curve (points sorted by latency, linear in between, the baseline at latency
1.0); null where a channel-only method has no point at or below that latency; ``matched``: per target and method the
rows' mean top-1 (min, max) and latency over seeds (the like-for-like pairs: channel rows are bisected to their depth
row's latency); and the paper's claim per method, ``flops_reduction_within_0.3pt``: the point (mean over seeds) with
the most FLOPs removed for at most 0.3 pt lost.
``--retime`` (run alone on the machine; trains nothing): each row's latency_rel was measured when the row finished,
over several sessions and next to different training jobs, and drifts (the same structure measured 0.05-0.12 apart
at batch 1); it rebuilds every row's deployed structure (depth: its removed gates; meta_*: its ratio and
calibration batch; slim, groupnorm, joint, whose structure depends on their training: the
``structure`` their rows record; rows written before rows recorded it cannot be rebuilt; checked by FLOPs) and
times them all with the baseline in one interleaved run per arch. Every retime is kept
(``NAME_retimes/<UTC time>.json``): between retimes on the same day, each alone
on the machine, channel rows moved by up to 0.065 while each retime's own passes agree within 0.04, so one retime is
not the figure; the summary's ``retimed`` holds the same verdict over those methods at each row's median latency_rel
over every retime that measured it as it is now (``retimes``: each retime's value per row), on the CPU of the newest
retime (``cpu``; retimes of other machines are kept but not pooled: latency ratios are the machine's).

Usage: python benchmarks/equal_latency.py [--quick] [--archs ...] [--targets ...] [--seeds 0 1] [--methods ...]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import resconv_plugin
from resconv_plugin.data import build_datasets, calibration_batch
from resconv_plugin.deploy.structure import apply_structure, describe
from resconv_plugin.integrations.torch_pruning import channel_pruner
from resconv_plugin.pruning import bisect_ratio
from resconv_plugin.workflow import (
    RECIPES, CompressionConfig, ConfigError, StageSettings, compress, evaluate, train_stage,
)
from common import RESULTS, curve_at, environment, write_json, write_results

BASELINES = Path(__file__).resolve().parent / "baselines"
EXAMPLE = torch.zeros(1, 1, 28, 28)
#: The block setting (benchmark 6's best): one gate per residual block, magnitude selection.
BLOCK = {"level": "block", "importance": "magnitude"}
#: CompressionConfig settings of each depth-based method that differ from the command's defaults.
#: The command's defaults before the measured-best recipe became the default (``default``): layer gates.
LAYER = {"level": "layer", "importance": "removal-iterative"}
DEPTH_SETTINGS = {"default": {}, "depth": LAYER, "joint": {"channel_pruning": "auto"}, "depth_block": BLOCK,
                  "depth_block_short": BLOCK, "depth_block_oneshot": {"level": "block", "importance": "removal-iterative"}}
DEPTH_METHODS = tuple(DEPTH_SETTINGS)
#: Methods that train the command's default recipe's epochs (no epoch option given).
RECIPE_METHODS = ("default", "joint")
#: Methods that spend the run's total epochs with this many in sparsity training and the rest fine-tuning.
SPARSITY_EPOCHS = {"depth_block_short": 1, "depth_block_oneshot": 0}
CHANNEL_METHODS = ("slim", "groupnorm", "meta_taylor", "meta_magnitude")
REGULARISED = {"slim": 1e-4, "groupnorm": 1e-4}  # torch-pruning's default reg strengths
#: Methods whose deployed structure depends on the training (regularised weights, channels pruned after training):
#: their rows record it (``structure``) so that ``--retime`` can time them.
TRAINED_STRUCTURE = ("slim", "groupnorm", "joint")


def channel_spec(method):
    """(pruner class, importance, round_to) of a channel method name (``slim``, ``meta_taylor_r8``, ...)."""
    import torch_pruning as tp

    base, _, rounding = method.partition("_r")
    round_to = int(rounding) if rounding else None
    classes = {"slim": (tp.pruner.BNScalePruner, tp.importance.BNScaleImportance()),
               "groupnorm": (tp.pruner.GroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2)),
               "meta_taylor": (tp.pruner.MetaPruner, tp.importance.GroupTaylorImportance()),
               "meta_magnitude": (tp.pruner.MetaPruner, tp.importance.GroupMagnitudeImportance(p=2))}
    if base not in classes:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(DEPTH_METHODS + CHANNEL_METHODS)} "
                         "(channel methods optionally with _r8)")
    return (*classes[base], round_to)


def latency_rel(model, base_plain, repeats):
    plain = resconv_plugin.deployed(model)
    times = resconv_plugin.interleaved_latencies({"m": lambda: plain(EXAMPLE), "b": lambda: base_plain(EXAMPLE)},
                                                 repeats=repeats)
    return times["m"] / times["b"]


def rebuild(record, base, data):
    """The deployed structure of a finished row, rebuilt from the baseline (weights: the baseline's, pruned as the row
    was, or placeholders; timing does not depend on them), or None where it cannot be (a row whose structure depends
    on its training and was written before rows recorded it) or is not reproduced (its FLOPs differ from the row's).
    Rows with ``structure`` (slim, groupnorm, joint: regularised weights or channels pruned after
    training decide it; ``resconv_plugin.deploy.structure.describe`` of the deployed model): the deployed baseline
    reshaped to it (``apply_structure``), with random weights; depth / depth_block: the row's ``removed`` gates
    (converted at the method's level) set to 0 and removed (``LayerPruner(threshold=0)``); meta_*: the row's channel
    ratio on its calibration batch (seed)."""
    method = record["method"]
    base_plain = resconv_plugin.deployed(base).eval()
    if "structure" in record:  # the deployed structure, recorded: the same shapes, placeholder weights
        plain = apply_structure(copy.deepcopy(base_plain), record["structure"])
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # apply_structure leaves re-created tensors uninitialised (NaN, denormals: slow)
            for p in plain.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
            for name, b in plain.named_buffers():
                if b.is_floating_point():
                    b.fill_(1.0 if name.endswith("running_var") else 0.0)
    elif method in DEPTH_SETTINGS and "channel_pruning" not in DEPTH_SETTINGS[method]:  # gates removed, nothing else
        model = copy.deepcopy(base).eval()
        resconv_plugin.convert(model, EXAMPLE, level=DEPTH_SETTINGS[method].get("level", CompressionConfig.level))
        gates = resconv_plugin.gated_modules(model)
        with torch.no_grad():
            for name in record["removed"]:
                gates[name].gamma.zero_()
        resconv_plugin.LayerPruner(model, EXAMPLE, threshold=0.0).step()
        plain = resconv_plugin.deployed(model).eval()
    elif method.partition("_r")[0] in ("meta_taylor", "meta_magnitude"):
        model = prune_channels(base, method, record["channel_ratio"], calibration_batch(data, 256, seed=record["seed"]))
        plain = resconv_plugin.deployed(model).eval()
    else:
        return None
    flops_rel = resconv_plugin.count_flops(plain, EXAMPLE).total / resconv_plugin.count_flops(base_plain, EXAMPLE).total
    return plain if abs(flops_rel - record["flops_rel"]) < 1e-6 else None


def retime(records, bases, data, repeats, passes=3):
    """Every rebuildable row's deployed model and its arch's baseline timed in one interleaved run per arch (median of
    ``repeats`` rounds), ``passes`` times: latency_rel under the same conditions for every point, free of the drift
    between the rows' own measurements (taken over several sessions, next to different training jobs). Returns
    ({key: median latency_rel over the passes}, {key: every pass's latency_rel}, the keys that could not be
    rebuilt)."""
    runs, skipped = {}, []
    for arch, base in bases.items():
        models = {"": resconv_plugin.deployed(base).eval()}
        for r in records:
            if r["arch"] == arch:
                plain = rebuild(r, base, data)
                if plain is None:
                    skipped.append(r["key"])
                else:
                    models[r["key"]] = plain
        for _ in range(passes):
            with torch.no_grad():
                times = resconv_plugin.interleaved_latencies(
                    {k: (lambda m=m: m(EXAMPLE)) for k, m in models.items()}, repeats=repeats)
            for k, t in times.items():
                if k:
                    runs.setdefault(k, []).append(t / times[""])
        print(f"{arch}: {len(models) - 1} rows retimed, {passes} runs of {repeats} rounds", flush=True)
    return {k: statistics.median(v) for k, v in runs.items()}, runs, skipped


SPARSITY_LR = 0.02  # slim / groupnorm regularised training, like the command's --sparsity-lr default
#: Schedule values of rows written before the option existed.
SCHEDULE_DEFAULTS = {"finetune_lr": 0.02}


def settings(name, epochs, seed, lr):
    return StageSettings(name=name, epochs=epochs, lr=lr, seed=seed, progress=False, distill_alpha=0.5)


def default_split(base):
    """(sparsity epochs, fine-tuning epochs) of the command's default recipe for ``base``'s architecture."""
    level = resconv_plugin.convert(copy.deepcopy(base), EXAMPLE, level="auto").level
    return RECIPES[level].sparsity_epochs, RECIPES[level].finetune_epochs


def method_schedule(method, schedule, base=None):
    """The schedule ``method``'s rows train with: the run's ``schedule``, except for the methods of
    ``SPARSITY_EPOCHS``, which spend the same total epochs with that many in sparsity training (all of them
    when the total is smaller), and ``RECIPE_METHODS``, which train the default recipe's epochs (``base``: the
    model they prune, whose architecture decides the recipe)."""
    if method in RECIPE_METHODS:
        sparsity, finetune = default_split(base)
        return dict(schedule, sparsity_epochs=sparsity, finetune_epochs=finetune)
    if method not in SPARSITY_EPOCHS:
        return schedule
    total = schedule["sparsity_epochs"] + schedule["finetune_epochs"]
    sparsity = min(SPARSITY_EPOCHS[method], total)
    return dict(schedule, sparsity_epochs=sparsity, finetune_epochs=total - sparsity)


def depth_row(method, arch, target, seed, base, data, args, schedule):
    """default / depth / joint / depth_block / depth_block_short through the public pipeline (the same code as
    ``resconv compress``), trained with ``schedule`` (:func:`method_schedule`)."""
    out = Path(args.runs) / f"{arch}-{method}-t{target}-s{seed}"
    epochs = {} if method in RECIPE_METHODS else {k: schedule[k] for k in ("sparsity_epochs", "finetune_epochs")}
    config = CompressionConfig(model=arch, epochs=0, latency_reduction=round(1 - target, 6), **DEPTH_SETTINGS[method],
                               **epochs, finetune_lr=args.finetune_lr, train_subset=args.train_subset, seed=seed,
                               output=out, latency_repeats=args.repeats, plots=False, progress=False)
    report = compress(config, data=data, model=base)
    ran = (report["recipe"]["sparsity_epochs"], report["recipe"]["finetune_epochs"])
    if ran != (schedule["sparsity_epochs"], schedule["finetune_epochs"]):
        raise RuntimeError(f"{out}: trained {ran[0]} + {ran[1]} epochs, the row's schedule says {schedule}")
    stages = {r["stage"]: r for r in report["stages"]}
    model = resconv_plugin.load(out / "model.safetensors")
    return model, {"removed": report["removed"], "recipe": report["recipe"], "channel_ratio": stages.get("channel_pruned", {}).get("channel_ratio"),
                   "latency_fit": report.get("latency_fit"), "restarts": report.get("restarts", []),
                   **({"joint_plan": report["joint_plan"]} if report.get("joint_plan") else {})}


def prune_channels(model, method, ratio, calib):
    """A copy of ``model`` with ``ratio`` of its channels pruned (global) by ``method``'s importance."""
    cls, importance, round_to = channel_spec(method)
    candidate = copy.deepcopy(model).eval()
    if ratio <= 0:
        return candidate
    kwargs = {"round_to": round_to} if round_to else {}
    pruner = channel_pruner(candidate, EXAMPLE, cls, importance=importance, pruning_ratio=ratio,
                            global_pruning=True, **kwargs)
    if "taylor" in method:  # first-order importance needs gradients: one calibration batch
        candidate.zero_grad()
        torch.nn.functional.cross_entropy(candidate(calib[0]), calib[1]).backward()
    pruner.step()
    candidate.zero_grad(set_to_none=True)
    return candidate.eval()


def match_latency(model, method, target, base_plain, calib, args, tolerance=0.02, iterations=12, reference=None):
    """Bisect the channel pruning ratio until the deployed model's measured latency lies in [target - tolerance,
    target] (relative to the baseline; so that a channel row is not slower than the depth row it is compared with
    and its curve can be read at the depth row's latency), with the library's search
    (``resconv_plugin.pruning.bisect_ratio``: each try timed three times, read at the median); returns (model,
    ratio, measured latency_rel, every try as [ratio, latency_rel]) of the try chosen (the in-band try of the
    highest latency, else the highest at or below the target, else the fastest).

    ``reference``: the depth row's deployed structure (rebuilt), whose latency_rel is ``target``: each try is then
    timed in turns with it, not with the baseline, and its latency_rel read as target x (try / reference), so that
    the match does not depend on the drift between the depth row's own measurement and this one. Rows before the
    library's search aimed at the band's middle with one timing per try."""
    def cost(candidate):
        if reference is None:
            return latency_rel(candidate, base_plain, args.repeats)
        return target * latency_rel(candidate, reference, args.repeats)

    search = bisect_ratio(lambda ratio: prune_channels(model, method, ratio, calib), cost, target,
                          tolerance=tolerance, iterations=iterations, confirm=3)
    return search.model, search.ratio, search.cost_rel, [[ratio, rel] for ratio, rel, _ in search.tries]


def channel_row(method, arch, target, seed, base, data, calib, base_plain, rows_dir, args):
    depth_path = rows_dir / f"{arch}-depth-t{target}-s{seed}.json"
    depth = json.loads(depth_path.read_text()) if depth_path.exists() else None
    goal = depth["latency_rel"] if depth else target
    reference = rebuild(depth, base, data) if depth else None
    model = copy.deepcopy(base).eval()
    name = method.partition("_r")[0]
    if name in REGULARISED:  # sparsity training with the pruner's regulariser, then prune
        cls, importance, round_to = channel_spec(method)
        regulariser = channel_pruner(model, EXAMPLE, cls, importance=importance, reg=REGULARISED[name],
                                     global_pruning=True, **({"round_to": round_to} if round_to else {}))
        sparsity = settings(f"{method} sparsity", args.sparsity_epochs, seed + 1, SPARSITY_LR)
        restarts = train_stage(model, data, sparsity, regularizers=[regulariser], teacher=base).restarts
        model, ratio, _, tries = match_latency(model.eval(), method, goal, base_plain, calib, args, reference=reference)
        epochs = args.finetune_epochs
    else:  # prune first, then train for the same total epochs
        model, ratio, _, tries = match_latency(model, method, goal, base_plain, calib, args, reference=reference)
        epochs, restarts = args.sparsity_epochs + args.finetune_epochs, []
    restarts += train_stage(model, data, settings(f"{method} finetune", epochs, seed + 2, args.finetune_lr),
                            teacher=base).restarts
    info = {"channel_ratio": ratio, "latency_goal": goal, "bisection": tries, "restarts": restarts}
    if reference is not None:  # the like-for-like figure: this row / its depth row, timed in turns now
        info["latency_vs_depth"] = latency_rel(model.eval(), reference, args.repeats)
    return model.eval(), info


def check_schedule(record, schedule):
    """A finished row is reused only if it was trained with this run's schedule: rows of different schedules are
    not comparable."""
    used = {k: record.get(k, SCHEDULE_DEFAULTS.get(k)) for k in schedule}
    if used != schedule:
        raise ValueError(f"row {record['key']} was trained with {used}, this run asks for {schedule}: use the same "
                         "--train-subset / --sparsity-epochs / --finetune-epochs, or another --rows selection")


def row_keys(archs, targets, seeds, methods):
    """Depth first for every point (the channel rows match its measured latency)."""
    ordered = [m for m in methods if m == "depth"] + [m for m in methods if m != "depth"]
    return [f"{a}-{m}-t{t}-s{s}" for a in archs for s in seeds for t in targets for m in ordered]


def parse_key(key):
    arch, rest = key.split("-", 1)
    method, target, seed = rest.rsplit("-", 2)
    return arch, method, float(target[1:]), int(seed[1:])


def load_baseline(arch, args, data):
    if args.quick:
        cache = Path(args.runs) / f"quick_base_{arch}.safetensors"
        if cache.exists():
            return resconv_plugin.load(cache)
        import timm

        torch.manual_seed(0)
        base = timm.create_model(arch, num_classes=10, in_chans=1)
        train_stage(base, data, StageSettings(name="quick baseline", epochs=1, lr=0.1, progress=False))
        resconv_plugin.save(base.eval(), cache, model_name=arch, model_kwargs={"num_classes": 10, "in_chans": 1})
        return base
    path = BASELINES / f"{arch}_fmnist.safetensors"
    return resconv_plugin.load(path) if path.exists() else None


def advantage_at(rows, base_top1, targets):
    """advantage_pt per target (the issue's definition) and a note per null value, from ``rows``' latency_rel.

    A method's curve per seed counts only for the seeds with a row at every target the method has rows at (a seed
    run at one target only, as a third seed to test one point, has no curve; it counts in ``matched``)."""
    by_method, targets_of = {}, {}
    for r in rows:
        by_method.setdefault(r["method"], {}).setdefault(r["seed"], []).append((r["latency_rel"], r["top1"]))
        targets_of.setdefault(r["method"], {}).setdefault(r["seed"], set()).add(r["target"])
    for method, seeds in targets_of.items():
        covered = set().union(*seeds.values())
        by_method[method] = {seed: by_method[method][seed] for seed, ts in seeds.items() if ts == covered}
    advantage, notes = {}, {}
    for t in targets:
        def best(methods):
            means = []
            for m in methods:
                values = [curve_at(pts + [(1.0, base_top1)], t) for pts in by_method.get(m, {}).values()]
                if values and all(v is not None for v in values):
                    means.append(statistics.mean(values))
            return max(means) if means else None

        depth = best([m for m in by_method if m in DEPTH_METHODS])
        channel = best([m for m in by_method if m not in DEPTH_METHODS])
        advantage[str(t)] = None if depth is None or channel is None else depth - channel
        missing = [side for side, value in (("depth-based", depth), ("channel-only", channel)) if value is None]
        if missing:
            notes[str(t)] = (f"null: no {' and no '.join(missing)} method has a point at or below {t} of the "
                             "latency on every seed")
    return advantage, notes


def point(r):
    """A row as the summary's point."""
    return {k: r[k] for k in ("method", "seed", "latency_rel", "top1", "flops_rel")}


def with_refusals(notes, refused):
    """Each refused row's reason added to its target's note ({target: note}, in place)."""
    for key, why in refused.items():
        _, method, target, seed = parse_key(key)
        t = str(target)
        notes[t] = f"{notes[t]}; " if t in notes else ""
        notes[t] += f"{method} seed {seed} not run: {why}"


def summarise(records, baselines, targets, retimed=None, not_run=None, retimes=None, cpu=None):
    """Per arch: every point, advantage_pt and its notes, matched, the paper's claim; with ``retimed`` ({key:
    latency_rel}: each row's median over the retimes) also ``retimed``: the same verdict over the methods whose every
    row was retimed, at the retimed latencies (``retimes``, {key: [each retime's latency_rel]}, and ``cpu``, the
    machine of those retimes, kept with it); with
    ``not_run`` ({key: why}: rows the pipeline refused before training, e.g.
    a latency budget depth alone cannot reach) also ``not_run``, its reasons added to that target's notes."""
    summary = {"archs": {}}
    for arch, base_top1 in baselines.items():
        rows = [r for r in records if r["arch"] == arch]
        points = [point(r) for r in rows]
        refused = {k: why for k, why in (not_run or {}).items() if parse_key(k)[0] == arch}
        advantage, notes = advantage_at(rows, base_top1, targets)
        with_refusals(notes, refused)
        summary["archs"][arch] = {"baseline_top1": base_top1, "points": points, "advantage_pt": advantage,
                                  "notes": notes, **({"not_run": refused} if refused else {}),
                                  "matched": matched(rows), "joint_proxy": joint_proxy(rows),
                                  "flops_reduction_within_0.3pt": paper_claim(rows, base_top1)}
        if retimed:
            methods = sorted({r["method"] for r in rows}
                             - {r["method"] for r in rows if r["key"] not in retimed})
            same = [dict(r, latency_rel=retimed[r["key"]]) for r in rows if r["method"] in methods]
            if same:
                advantage, notes = advantage_at(same, base_top1, targets)
                with_refusals(notes, refused)
                summary["archs"][arch]["retimed"] = {
                    **({"cpu": cpu} if cpu else {}), "methods": methods, "advantage_pt": advantage, "notes": notes,
                    "matched": matched(same), "points": [point(r) for r in same],
                    **({"retimes": {r["key"]: retimes[r["key"]] for r in same}} if retimes else {})}
    return summary


def joint_proxy(rows):
    """How well the joint planner's score (its short distilled training's held-out loss, lower is better) ranks its
    candidates by what full training gives them, on the rows there are: per ``joint`` row, each candidate with the
    top-1 of a trained row of the same structure where one exists (the candidate it chose: the joint row itself; the
    depth plan, blocks only: the ``default`` row, when it removed the same blocks; pure width: the ``meta_taylor``
    row, Taylor channels bisected on its own and trained the same total epochs). ``concordant`` / ``pairs``: the
    pairs of trained candidates of one row whose lower score had the higher top-1 (Kendall's tau = (concordant -
    discordant) / pairs); None without pairs."""
    by_key = {(r["arch"], r["method"], r["target"], r["seed"]): r for r in rows}
    out, concordant, pairs = [], 0, 0
    for r in rows:
        if r["method"] != "joint" or not r.get("joint_plan"):
            continue
        plan = r["joint_plan"]
        twin = {m: by_key.get((r["arch"], m, r["target"], r["seed"])) for m in ("default", "meta_taylor")}
        candidates = []
        for c in plan["candidates"]:
            trained, by = None, None
            if (sorted(c["depth_names"]), c["channel_ratio"]) == (sorted(plan["best"]["depth_names"]),
                                                                  plan["best"]["channel_ratio"]):
                trained, by = r["top1"], "joint"
            elif c["channel_ratio"] == 0 and twin["default"] and sorted(twin["default"]["removed"]) == sorted(
                    c["depth_names"]):
                trained, by = twin["default"]["top1"], "default"
            elif not c["depth_names"] and twin["meta_taylor"]:
                trained, by = twin["meta_taylor"]["top1"], "meta_taylor"
            candidates.append({"kind": c["kind"], "blocks": len(c["depth_names"]), "channel_ratio": c["channel_ratio"],
                               "score": c["score"], "trained_top1": trained, "trained_by": by})
        known = [c for c in candidates if c["trained_top1"] is not None and c["score"] == c["score"]]
        for i, a in enumerate(known):
            for b in known[i + 1:]:
                if a["score"] != b["score"] and a["trained_top1"] != b["trained_top1"]:
                    pairs += 1
                    concordant += (a["score"] < b["score"]) == (a["trained_top1"] > b["trained_top1"])
        out.append({"key": r["key"], "candidates": candidates})
    return {"pairs": pairs, "concordant": concordant,
            "tau": (2 * concordant - pairs) / pairs if pairs else None, "rows": out}


def matched(rows):
    """Per target and method, the mean (and spread) over seeds of the rows themselves: each channel row is bisected to
    its depth row's measured latency, so these are the like-for-like pairs even where a curve cannot be read at the
    target (a channel row landing a little above it, where ``advantage_pt`` is null by definition)."""
    out = {}
    for target in sorted({r["target"] for r in rows}, reverse=True):
        for method in sorted({r["method"] for r in rows if r["target"] == target}):
            same = [r for r in rows if r["target"] == target and r["method"] == method]
            top1 = [r["top1"] for r in same]
            out.setdefault(str(target), {})[method] = {
                "seeds": sorted(r["seed"] for r in same), "top1": statistics.mean(top1),
                "top1_min": min(top1), "top1_max": max(top1),
                "latency_rel": statistics.mean(r["latency_rel"] for r in same),
                "flops_rel": statistics.mean(r["flops_rel"] for r in same)}
    return out


def paper_claim(rows, base_top1, tolerance=0.3):
    """Per method, its measured point (a target, mean over its seeds) with the largest FLOPs reduction whose mean top-1
    is at most ``tolerance`` pt below the baseline (the paper: 65% of cifar_resnet56's FLOPs for 0.13 pt); None when
    no point is that close."""
    claim = {}
    for method in sorted({r["method"] for r in rows}):
        best = None
        for target in sorted({r["target"] for r in rows if r["method"] == method}):
            same = [r for r in rows if r["method"] == method and r["target"] == target]
            change = statistics.mean(r["top1"] for r in same) - base_top1
            reduction = 1 - statistics.mean(r["flops_rel"] for r in same)
            if change >= -tolerance and (best is None or reduction > best["flops_reduction"]):
                best = {"target": target, "seeds": sorted(r["seed"] for r in same), "flops_reduction": reduction,
                        "top1_change": change, "latency_rel": statistics.mean(r["latency_rel"] for r in same)}
        claim[method] = best
    return claim


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(summary["archs"])
    if not archs:
        return
    panels = [(arch, "as run", summary["archs"][arch]["points"]) for arch in archs]
    panels += [(arch, "retimed", summary["archs"][arch]["retimed"]["points"]) for arch in archs
               if summary["archs"][arch].get("retimed")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (arch, how, points) in zip(axes[0], panels):
        info = summary["archs"][arch]
        for method in sorted({p["method"] for p in points}):
            pts = sorted((p["latency_rel"], p["top1"], p["seed"]) for p in points if p["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" if method in DEPTH_METHODS else "x", label=method)
        ax.axhline(info["baseline_top1"], color="grey", lw=0.8, ls="--", label="baseline")
        ax.set(title=f"{arch} (latency {how})", xlabel="CPU latency / baseline (batch 1, deployed)",
               ylabel="top-1 % (Fashion-MNIST)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.6, 0.45, 0.35])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+",
                        default=["default", "depth", "joint", "depth_block", "slim", "groupnorm", "meta_taylor"],
                        help="the grid's default: the pilot (equal_latency_pilot.md) found round_to=8 no help at equal "
                             "latency and Taylor / magnitude level; any of default, depth, joint, depth_block, "
                             "depth_block_short, depth_block_oneshot, slim, groupnorm, meta_taylor, meta_magnitude, "
                             "channel methods optionally with _r8")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--sparsity-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="peak rate (cosine) of the training after pruning, every method: depth's --finetune-lr, "
                             "the channel methods' fine-tuning (meta_*: all their epochs); default: the command's "
                             "--finetune-lr default (CompressionConfig.finetune_lr)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", nargs="*", default=["*"], help="fnmatch patterns of row keys to run")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runs", default=None, help="working folders of the pipeline rows (default runs/NAME, NAME "
                                                    "from --results-name)")
    parser.add_argument("--results-name", default="equal_latency", help="results file stem and rows folder "
                                                                          "(benchmarks/results/NAME_rows), e.g. for a "
                                                                          "pilot kept apart from the grid")
    parser.add_argument("--retime", action="store_true",
                        help="time every finished row that can be rebuilt (depth, meta_*) with its baseline in one "
                             "interleaved run per arch (run it alone on the machine), add it to NAME_retimes/ and "
                             "the summary's 'retimed' verdict; trains nothing")
    parser.add_argument("--retime-repeats", type=int, default=200)
    parser.add_argument("--retime-passes", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="cifar_resnet20, 1024 images, 1 + 1 epochs, target "
                                                              "0.6, seed 0, depth and slim_r8 (under 2 minutes)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.results_name
    if args.finetune_lr is None:
        args.finetune_lr = CompressionConfig().finetune_lr
    args.runs = args.runs or f"runs/{name}"
    if args.quick:
        args.archs, args.targets, args.seeds, args.methods = ["cifar_resnet20"], [0.6], [0], ["depth", "slim_r8"]
        args.train_subset, args.sparsity_epochs, args.finetune_epochs, args.repeats = 1024, 1, 1, 10
        args.runs, name = "runs/equal_latency_quick", "equal_latency_quick"
    for m in args.methods:
        if m not in DEPTH_METHODS:
            channel_spec(m)  # fail before any training on an unknown name
    rows_dir = RESULTS / f"{name}_rows"
    schedule = {"train_subset": args.train_subset, "sparsity_epochs": args.sparsity_epochs,
                "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr}
    data = build_datasets("fashion-mnist", train_subset=args.train_subset, val_subset=2000 if args.quick else 0)
    baselines, bases = {}, {}
    for arch in args.archs:
        base = load_baseline(arch, args, data)
        if base is None:
            print(f"note: {BASELINES / (arch + '_fmnist.safetensors')} is missing: {arch} skipped (train it with "
                  f"python benchmarks/baselines/train.py --arch {arch})", flush=True)
            continue
        bases[arch] = base.eval()
        baselines[arch] = evaluate(bases[arch], data)
    if args.retime:
        records = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
        retimed, runs, skipped = retime([r for r in records if r["arch"] in bases], bases, data,
                                        args.retime_repeats, args.retime_passes)
        finished = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        write_json(RESULTS / f"{name}_retimes" / f"{finished}.json", {
            "definition": "latency_rel of each row's deployed structure (rebuilt from the baseline) and the baseline, "
                          "all timed in turns in one run per arch (median of repeats rounds, batch 1), passes runs; "
                          "latency_rel: the median over the passes, passes_latency_rel: each",
            "repeats": args.retime_repeats, "passes": args.retime_passes, "threads": torch.get_num_threads(),
            "latency_rel": retimed, "passes_latency_rel": runs, "not_rebuilt": skipped,
            "flops_rel": {r["key"]: r["flops_rel"] for r in records if r["key"] in retimed},
            "finished": finished, "environment": environment()})
        report(name, rows_dir, baselines, args.targets)
        return
    keys = [k for k in row_keys(list(bases), args.targets, args.seeds, args.methods)
            if any(fnmatch.fnmatch(k, p) for p in args.rows)]
    print(f"{len(keys)} rows ({sum((rows_dir / f'{k}.json').exists() for k in keys)} done)", flush=True)
    not_run_path, not_run = load_not_run(name)
    for key in keys:
        path = rows_dir / f"{key}.json"
        arch, method, target, seed = parse_key(key)
        trained_with = method_schedule(method, schedule, bases[arch])
        if path.exists():
            check_schedule(json.loads(path.read_text()), trained_with)
            continue
        base, start = bases[arch], time.time()
        base_plain = resconv_plugin.deployed(base)
        if method in DEPTH_METHODS:
            try:
                model, info = depth_row(method, arch, target, seed, base, data, args, trained_with)
            except ConfigError as exc:  # raised before any training, e.g. a budget depth alone cannot reach
                print(f"note: {key} not run: {exc}", flush=True)
                not_run[key] = str(exc)
                write_json(not_run_path, not_run)
                continue
        else:
            calib = calibration_batch(data, 256, seed=seed)
            model, info = channel_row(method, arch, target, seed, base, data, calib, base_plain, rows_dir, args)
        plain = resconv_plugin.deployed(model)
        if method.partition("_r")[0] in TRAINED_STRUCTURE:  # what --retime rebuilds and times
            info["structure"] = describe(plain)
        record = {"key": key, "arch": arch, "method": method, "target": target, "seed": seed,
                  "top1": evaluate(model, data), "baseline_top1": baselines[arch],
                  "latency_rel": latency_rel(model, base_plain, args.repeats),
                  "flops_rel": resconv_plugin.count_flops(plain, EXAMPLE).total
                  / resconv_plugin.count_flops(base_plain, EXAMPLE).total,
                  **info, **trained_with, "minutes": (time.time() - start) / 60,
                  "environment": environment()}
        write_json(path, record)
        if not_run.pop(key, None) is not None:
            write_json(not_run_path, not_run)
        brief = {k: v for k, v in record.items()
                 if k not in ("environment", "removed", "latency_fit", "bisection", "structure", "joint_plan")}
        print(json.dumps(brief), flush=True)
    report(name, rows_dir, baselines, args.targets)


def current_retimes(saved, records):
    """({key: retimed latency_rel} of the rows the retimed file measured, the keys of rows rerun since then): a row
    counts as the one measured when its FLOPs are those recorded with the retime."""
    rows_flops = {r["key"]: r["flops_rel"] for r in records}
    current = {k: v for k, v in saved["latency_rel"].items()
               if k in rows_flops and saved.get("flops_rel", {}).get(k) == rows_flops[k]}
    return current, sorted(set(saved["latency_rel"]) & set(rows_flops) - set(current))


def cpu_of(saved):
    """The CPU a retime file was made on (None for a file without its environment)."""
    return saved.get("environment", {}).get("cpu")


def retime_cpu(retimes):
    """The CPU of the newest retime (None without one): the machine whose verdict the summary's ``retimed`` is."""
    newest = max(retimes, key=lambda saved: saved.get("finished", ""), default=None)
    return None if newest is None else cpu_of(newest)


def combined_retimes(retimes, records, cpu=None):
    """Every retime file's values for the rows it measured as they are now (:func:`current_retimes`): ({key: median
    latency_rel over those retimes}, {key: each retime's latency_rel, oldest first}, the keys no retime measured as
    they are now although one measured them before). With ``cpu``, only the retimes made on that CPU: latency ratios
    are a property of the machine (the same structures measured 0.10 lower relative to the baseline on an AMD EPYC
    than on an Intel Xeon), so retimes of two machines are not pooled."""
    each, stale = {}, set()
    retimes = [saved for saved in retimes if cpu is None or cpu_of(saved) == cpu]
    for saved in sorted(retimes, key=lambda saved: saved.get("finished", "")):
        current, old = current_retimes(saved, records)
        for key, value in current.items():
            each.setdefault(key, []).append(value)
        stale.update(old)
    return {k: statistics.median(v) for k, v in each.items()}, each, sorted(stale - set(each))


def load_not_run(name):
    """(path, {key: why}) of the rows the pipeline refused before training (tried again on every run; a row that
    later finishes leaves the file)."""
    path = RESULTS / f"{name}_not_run.json"
    return path, json.loads(path.read_text()) if path.exists() else {}


def report(name, rows_dir, baselines, targets):
    records = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    records = [r for r in records if r["arch"] in baselines]
    retimes = [json.loads(p.read_text()) for p in sorted((RESULTS / f"{name}_retimes").glob("*.json"))]
    cpu = retime_cpu(retimes)
    retimed, each, stale = combined_retimes(retimes, records, cpu)
    others = sum(cpu_of(saved) != cpu for saved in retimes)
    if others:
        print(f"note: the retimed verdict is this CPU's ({cpu}); {others} retimes made on other CPUs are kept in "
              f"{name}_retimes/ and not pooled", flush=True)
    if stale:
        print(f"note: {len(stale)} rows changed since the last retime (not retimed: {', '.join(stale)}); run "
              f"--retime again", flush=True)
    summary = summarise(records, baselines, targets, retimed, load_not_run(name)[1], each, cpu)
    header = ["arch", "target", "method", "seed", "top-1 %", "change", "latency vs base",
              f"retimed on {cpu} (median, retimes)", "FLOPs vs base", "channel ratio"]
    rows = [[r["arch"], r["target"], r["method"], r["seed"], f"{r['top1']:.2f}",
             f"{r['top1'] - r['baseline_top1']:+.2f}",
             f"{r['latency_rel']:.3f}",
             f"{retimed[r['key']]:.3f} ({len(each[r['key']])})" if r["key"] in retimed else "-",
             f"{r['flops_rel']:.3f}",
             "-" if r.get("channel_ratio") is None else f"{r['channel_ratio']:.3f}"]
            for r in sorted(records, key=lambda r: (r["arch"], -r["target"], r["method"], r["seed"]))]
    env = environment()  # the command that made this table; every row keeps its own
    write_results(name, {"environment": env, "records": records, "summary": summary}, header, rows,
                  notes=__doc__.split("Usage:")[0].strip().replace("\n", " "))
    write_json(RESULTS / f"{name}_summary.json", summary)
    plot(summary, RESULTS / f"{name}.png")
    print(json.dumps({a: {"advantage_pt": s["advantage_pt"], "retimed": s.get("retimed", {}).get("advantage_pt")}
                      for a, s in summary["archs"].items()}))


if __name__ == "__main__":
    main()
