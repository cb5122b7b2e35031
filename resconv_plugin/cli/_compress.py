"""The ``resconv compress`` workflow: stages, each checkpointed, so that re-running the command resumes.

baseline (train / fine-tune, or load ``--pretrained-file``) -> convert -> sparsity training (LayerPruner with a
budget and an importance criterion) -> prune -> optional channel pruning (torch-pruning, on the depth-pruned model
before fusion) -> fine-tune -> fuse -> save (``resconv_plugin.save``) -> report. With ``--distill`` the sparsity
training and the fine-tuning are distilled from the baseline.

Fine-tuning comes before fusion: fusion folds each ResConv's BatchNorm into its conv, and fine-tuning the fused,
BatchNorm-free layers lost 15 points of top-1 in a first benchmark run (cifar_resnet20, 50% FLOPs).

Everything the run needs to continue lives in ``<output>/checkpoint.pt`` (written atomically after every epoch and
every stage): the model's recipe and weights, the stage in progress with its optimizer / EMA / pruner state, and
the figures so far.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from resconv_plugin._convert import convert
from resconv_plugin._fuse import fuse
from resconv_plugin._io import build_from_recipe, load, make_recipe, save
from resconv_plugin.pruning import FixedSetImportance, JointPruner, LayerPruner, channel_pruner
from resconv_plugin.cli._dist import Dist
from resconv_plugin.cli._pretrained import create_baseline_model
from resconv_plugin._flops import count_flops
from resconv_plugin._surgery import freeze_gates, gated_modules
from resconv_plugin._deploy import deployed
from resconv_plugin.cli._report import stage_latencies, stage_table, write_report
from resconv_plugin.cli._train import StageSettings, evaluate, train_stage
from resconv_plugin.data import BatchLoader, ImageData, build_datasets, calibration_batch

__all__ = ["compress", "STAGES", "RESUME_IGNORED"]

log = logging.getLogger("resconv")

STAGES = ("baseline", "convert", "sparsity", "prune", "channel_prune", "finetune", "fuse", "save")
#: Settings that may change between a run and its resumption.
RESUME_IGNORED = {"output", "restart", "config", "progress", "workers", "log_level", "command", "device"}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def environment() -> Dict[str, Any]:
    import timm
    import torch_pruning

    from resconv_plugin import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "torch_pruning": torch_pruning.__version__, "resconv_plugin": __version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "threads": torch.get_num_threads()}


class Run:
    """The run's state on disk and in memory; stage functions read and update it."""

    def __init__(self, args, dist: Dist) -> None:
        self.args, self.dist = args, dist
        self.out = Path(args.output)
        self.path = self.out / "checkpoint.pt"
        self.settings = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())
                         if k not in RESUME_IGNORED}
        self.model: Optional[nn.Module] = None
        self.state: Dict[str, Any] = {"settings": self.settings, "done": [], "records": [], "progress": None,
                                      "gamma_trace": [], "epochs_log": [], "removed": [], "resumed": [],
                                      "removal": None, "recipe": None, "weights": None}
        if self.path.exists() and not args.restart:
            self._resume()

    def _resume(self) -> None:
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        differ = sorted((k for k in set(saved["settings"]) | set(self.settings)
                         if saved["settings"].get(k) != self.settings.get(k)),
                        key=lambda k: (k not in ("model", "data"), k))
        if differ:
            details = "; ".join(f"{k}: {saved['settings'].get(k)!r} -> {self.settings.get(k)!r}" for k in differ[:6])
            raise ValueError(f"{self.out} holds a run with other settings ({len(differ)} differ: {details}"
                             f"{'; ...' if len(differ) > 6 else ''}): re-run with the same "
                             f"settings to resume it, pass --restart to start over there, or choose another --output")
        self.state = saved
        if saved["recipe"] is not None:
            self.model = build_from_recipe(saved["recipe"], self.path)
            self.model.load_state_dict(saved["weights"])
            self.model.to(self.dist.device)
        progress = saved.get("progress")
        where = f"{progress['stage']} epoch {progress['epoch']}" if progress else f"after {saved['done'][-1:]}"
        self.state["resumed"].append({"at": where, "time": time.time()})
        log.info("resuming %s from %s (stages done: %s)", self.out, where, ", ".join(saved["done"]) or "none")

    def model_kwargs(self) -> Dict[str, Any]:
        a = self.args
        return {"num_classes": a.num_classes, "in_chans": a.in_chans, **(a.model_kwargs or {})}

    def save(self, progress: Optional[dict] = None) -> None:
        """Checkpoint (rank 0 writes, every rank waits)."""
        self.state["progress"] = progress
        if self.model is not None:
            self.state["recipe"] = make_recipe(self.model, model_name=self.args.model,
                                               model_kwargs=self.model_kwargs())
            self.state["weights"] = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.dist.main:
            _atomic_torch_save(self.state, self.path)
        self.dist.barrier()

    def record(self, stage: str, model: nn.Module, data: ImageData, example: torch.Tensor, **extra: Any) -> None:
        """Top-1, FLOPs and params of ``model`` as deployed; that deployed copy goes to ``stages/<stage>.safetensors``
        (reloadable with ``resconv_plugin.load``; the latencies of all stages are measured together at the end)."""
        if self.dist.main:
            top1 = evaluate(model, data)
            plain = deployed(model)
            flops = count_flops(plain, example)
            save(plain, self.out / "stages" / f"{stage}.safetensors", model_name=self.args.model,
                 model_kwargs=self.model_kwargs())
            entry = {"stage": stage, "top1": top1, "flops": int(flops.total), "params": int(flops.params),
                     "gates": len(gated_modules(model)), **extra}
            self.state["records"].append(entry)
            log.info("%s: top-1 %.2f%%, FLOPs %.2fM, params %.1fk", stage, top1, flops.total / 1e6,
                     flops.params / 1e3)
        self.state["records"] = self.dist.broadcast(self.state["records"])


def _stage_settings(args, name: str, epochs: int, lr: float, **overrides) -> StageSettings:
    return StageSettings(name=name, epochs=epochs, lr=lr, batch_size=args.batch_size, opt=args.opt,
                         momentum=args.momentum, weight_decay=args.weight_decay, sched=args.sched,
                         warmup_epochs=min(args.warmup_epochs, max(epochs - 1, 0)), min_lr=args.min_lr,
                         smoothing=args.smoothing, seed=args.seed + STAGES.index(name), workers=args.workers,
                         progress=args.progress, amp=None if args.amp == "none" else args.amp,
                         channels_last=args.channels_last, **overrides)


def _distill_settings(args) -> Dict[str, float]:
    return {"distill_alpha": args.distill_alpha if args.distill else 0.0,
            "distill_temperature": args.distill_temperature}


def _make_pruner(args, model: nn.Module, example: torch.Tensor, calib, dist: Dist,
                 sparsity_steps: Optional[int] = None, depth_set: Optional[List[str]] = None) -> LayerPruner:
    budget = dict(threshold=args.threshold, pruning_ratio=args.pruning_ratio, flops_reduction=args.flops_reduction,
                  latency_reduction=args.latency_reduction)
    importance, reg = args.importance, args.reg
    if depth_set is not None:  # --channel-pruning auto: depth takes the planned set, channels the rest
        gates = len(gated_modules(model))
        importance = FixedSetImportance(depth_set)
        budget = dict(pruning_ratio=len(depth_set) / gates) if depth_set else dict(threshold=0.0)
        reg = 0.0 if reg is None else reg
    pruner = LayerPruner(model, example, importance=importance, reg=reg, **budget, sparsity_steps=sparsity_steps,
                         cap_start=args.cap_start, calibration_inputs=calib[0], calibration_targets=calib[1],
                         ignored_layers=args.ignored_layers or None, latency_device=args.latency_device)
    if args.latency_reduction is not None:  # measured latency differs per process: rank 0's table decides
        pruner.load_state_dict(dist.broadcast(pruner.state_dict()))
    return pruner


def compress(args, dist: Dist) -> Dict[str, Any]:
    """Run (or resume) the whole workflow for parsed ``args``; returns the report (also written to disk)."""
    torch.manual_seed(args.seed)  # the same initial weights in every process
    data = build_datasets(args.data, args.data_dir, img_size=args.img_size, in_chans=args.in_chans,
                          train_subset=args.train_subset, val_subset=args.val_subset, seed=args.seed)
    if args.num_classes is None:
        args.num_classes = data.num_classes
    elif args.num_classes < data.num_classes:
        raise ValueError(f"--num-classes {args.num_classes} is fewer than the {data.num_classes} classes of "
                         f"{args.data}")
    args.in_chans = data.in_chans
    run = Run(args, dist)
    device = dist.device
    cpu_example = torch.zeros(1, data.in_chans, data.img_size, data.img_size)
    example = cpu_example.to(device)
    calib = tuple(t.to(device) for t in calibration_batch(data, 256, seed=args.seed))  # training images: no test
    # image decides what goes
    log.info("data %s: %d training / %d validation images, %d classes, %dx%dx%d", args.data, len(data),
             len(data.val[1]) if data.in_memory else len(data.val), data.num_classes, data.in_chans, data.img_size,
             data.img_size)
    teacher: List[Optional[nn.Module]] = [None]

    def train(name: str, epochs: int, lr: float, pruner=None, **overrides) -> None:
        progress = run.state["progress"] if (run.state["progress"] or {}).get("stage") == name else None
        resume = {k: v for k, v in progress.items() if k != "stage"} if progress else None
        settings = _stage_settings(args, name, epochs, lr, **overrides)

        def checkpoint(p) -> None:
            run.save({"stage": name, **p.to_dict()})

        result = train_stage(run.model, data, settings, dist, pruner=pruner, teacher=teacher[0], resume=resume,
                             on_epoch_end=checkpoint)
        run.state["epochs_log"].extend(result.epochs_log)
        run.state["gamma_trace"].extend(result.gamma_trace)

    def baseline() -> None:
        if run.model is None:
            run.model = create_baseline_model(args, run.out, dist).to(device)
            run.save()
        if args.epochs:
            train("baseline", args.epochs, args.lr, model_ema=args.model_ema, model_ema_decay=args.model_ema_decay,
                  mixup=args.mixup, cutmix=args.cutmix)
        if dist.main:
            save(run.model, run.out / "baseline.safetensors", model_name=args.model, model_kwargs=run.model_kwargs())
        run.record("baseline", run.model, data, example)

    def joint(model: nn.Module) -> JointPruner:
        reduction = args.latency_reduction if args.latency_reduction is not None else args.flops_reduction
        return JointPruner(model, example, reduction, calibration_inputs=calib[0], calibration_targets=calib[1],
                           cost="latency" if args.latency_reduction is not None else "flops",
                           importance=args.importance, latency_repeats=20)

    def convert_stage() -> None:
        report = convert(run.model, example, level=args.level, init_gamma=args.init_gamma)
        log.info("converted %d layers (%s level); %d convs skipped", len(report.converted), args.level,
                 len(report.skipped))
        if args.channel_pruning == "auto":
            plan = joint(run.model).plan()
            plan = dist.broadcast(plan)  # measured on rank 0's clock: every process follows the same plan
            run.state["joint_plan"] = {"target_rel": plan.target_rel, "best": dataclasses.asdict(plan.best),
                                       "candidates": [dataclasses.asdict(c) for c in plan.candidates]}
            for c in plan.candidates:
                log.info("joint plan: depth share %.2f: %d layers + channel ratio %.3f -> cost %.3f, proxy %.4g",
                         c.depth_share, len(c.depth_names), c.channel_ratio, c.cost_rel, c.score)
            log.info("joint plan: depth share %.2f chosen", plan.best.depth_share)

    def depth_set() -> Optional[List[str]]:
        plan = run.state.get("joint_plan")
        return plan["best"]["depth_names"] if plan else None

    def sparsity() -> None:
        steps = args.sparsity_epochs * len(BatchLoader(data, True, args.batch_size))
        pruner = _make_pruner(args, run.model, example, calib, dist, sparsity_steps=max(steps, 1),
                              depth_set=depth_set())
        if args.sparsity_epochs:
            if args.distill:
                teacher[0] = load(run.out / "baseline.safetensors")
            train("sparsity", args.sparsity_epochs, args.sparsity_lr, pruner=pruner, **_distill_settings(args))
            teacher[0] = None
        run.record("sparsity", run.model, data, example)

    def prune() -> None:
        annealed = args.sparsity_epochs > 0 and args.threshold is None  # the budget cap drove its set to exactly 0
        if annealed:  # remove exactly that set (and any other gate at 0): no re-ranking of a changed model
            pruner = LayerPruner(run.model, example, threshold=0.0, calibration_inputs=calib[0],
                                 ignored_layers=args.ignored_layers or None)
        else:
            pruner = _make_pruner(args, run.model, example, calib, dist, depth_set=depth_set())
        removed = pruner.step()
        if any(g == 0.0 for g in pruner.gates.values()):  # beyond the budget, but exactly the identity: free
            extra = LayerPruner(run.model, example, threshold=0.0, calibration_inputs=calib[0],
                                ignored_layers=args.ignored_layers or None)
            removed += extra.step()
            log.info("prune: also removed %d more gates at exactly 0 (%s)", len(extra.last_step.removed),
                     extra.last_step)
        run.state["removed"] = removed
        run.state["removal"] = str(pruner.last_step)
        log.info("prune: %s: %s", pruner.last_step, ", ".join(removed) or "nothing")
        run.record("pruned", run.model, data, example, removed=len(removed))

    def finetune() -> None:
        if not args.finetune_epochs:
            return
        if args.distill:
            teacher[0] = load(run.out / "baseline.safetensors")
        freeze_gates(run.model)  # the pruner no longer keeps them in [0, 1]
        train("finetune", args.finetune_epochs, args.finetune_lr, model_ema=args.model_ema,
              model_ema_decay=args.model_ema_decay, **_distill_settings(args))
        teacher[0] = None
        run.record("finetuned", run.model, data, example)

    def fuse_stage() -> None:
        with torch.no_grad():
            run.model = fuse(run.model.eval(), inplace=True)
        run.record("fused", run.model, data, example)

    def channel_prune() -> None:
        if not args.channel_pruning:
            return
        if args.channel_pruning == "auto":  # the rest of the budget, measured against the baseline, met exactly
            base = load(run.out / "baseline.safetensors").to(device)
            convert(base, example, level=args.level, init_gamma=args.init_gamma)
            pruned, ratio, rel = joint(base).meet(run.model.eval())
            pruned = dist.broadcast(pruned)
            run.model = pruned
            log.info("channel pruning: ratio %.3f meets the budget (cost %.3f of the baseline)", ratio, rel)
            run.record("channel_pruned", run.model, data, example, channel_ratio=ratio)
            return
        pruner = channel_pruner(run.model.eval(), example, pruning_ratio=args.channel_pruning, global_pruning=True)
        pruner.step()
        run.record("channel_pruned", run.model, data, example)

    def save_stage() -> None:
        if dist.main:
            save(run.model, run.out / "model.safetensors", model_name=args.model, model_kwargs=run.model_kwargs())
            log.info("saved %s", run.out / "model.safetensors")

    steps: Dict[str, Callable[[], None]] = {
        "baseline": baseline, "convert": convert_stage, "sparsity": sparsity, "prune": prune, "finetune": finetune,
        "fuse": fuse_stage, "channel_prune": channel_prune, "save": save_stage}
    if "convert" not in run.state["done"]:
        _preflight(args, cpu_example, run)
    for name in STAGES:
        if name in run.state["done"]:
            continue
        steps[name]()
        run.state["done"].append(name)
        run.save()
    return _finish(run, data, cpu_example)


def _preflight(args, example: torch.Tensor, run: Run) -> None:
    """Fail before any training when the model cannot be converted or the budget cannot be met."""
    import timm

    probe = run.model if run.model is not None else timm.create_model(args.model, **run.model_kwargs())
    probe = copy.deepcopy(probe).cpu()
    convert(probe, example, level=args.level, init_gamma=args.init_gamma)
    LayerPruner(probe, example, importance=args.importance, threshold=args.threshold, pruning_ratio=args.pruning_ratio,
                flops_reduction=args.flops_reduction, latency_reduction=args.latency_reduction, latency_repeats=5,
                latency_device=args.latency_device,
                ignored_layers=args.ignored_layers or None)


def _finish(run: Run, data: ImageData, example: torch.Tensor) -> Dict[str, Any]:
    records = run.state["records"]
    if run.dist.main:
        models = {r["stage"]: load(run.out / "stages" / f"{r['stage']}.safetensors") for r in records}
        log.info("timing the %d stages' models in turns (batch 1, %d rounds)", len(models), run.args.latency_repeats)
        for r, ms in zip(records, stage_latencies(models, example, run.args.latency_repeats).values()):
            r["latency_ms"] = ms
    records = run.state["records"] = run.dist.broadcast(records)
    first, last = records[0], records[-1]
    summary = {"top1_change": last["top1"] - first["top1"], "flops_reduction": 1 - last["flops"] / first["flops"],
               "params_reduction": 1 - last["params"] / first["params"],
               "latency_reduction": 1 - last["latency_ms"] / first["latency_ms"],
               "layers_removed": len(run.state["removed"])}
    report = {"settings": run.settings, "command": run.args.command, "environment": environment(),
              "stages": records, "summary": summary, "removed": run.state["removed"],
              "removal": run.state["removal"], "epochs": run.state["epochs_log"],
              "gamma_trace": run.state["gamma_trace"], "resumed": run.state["resumed"],
              "model_file": str(run.out / "model.safetensors")}
    if run.dist.main:
        write_report(report, run.out, plots=not run.args.no_plots)
        print("\n" + stage_table(records))
        print(f"\n{run.args.model} on {run.args.data}: top-1 {first['top1']:.2f}% -> {last['top1']:.2f}% "
              f"({summary['top1_change']:+.2f}), FLOPs -{100 * summary['flops_reduction']:.1f}%, params "
              f"-{100 * summary['params_reduction']:.1f}%, CPU latency {-100 * summary['latency_reduction']:+.1f}%, "
              f"{summary['layers_removed']} layers removed.\nreport: {run.out / 'report.md'}; model: "
              f"{run.out / 'model.safetensors'}", flush=True)
    return report
