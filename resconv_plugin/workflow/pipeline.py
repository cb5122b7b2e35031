"""The compression pipeline (``resconv compress``, :func:`compress`): stages, each checkpointed, so that running
the same config again resumes.

baseline (train / fine-tune, or load ``--pretrained-file``) -> convert -> sparsity training (LayerPruner with a
budget and an importance criterion) -> prune -> optional channel pruning (torch-pruning, on the depth-pruned model
before fusion) -> fine-tune -> fuse -> save (``resconv_plugin.save``) -> report. With ``--distill`` the sparsity
training and the fine-tuning are distilled from the baseline.

The workflow rules (how sparsity steps are counted, what is removed, fine-tuning with frozen gates before fusion)
are :mod:`resconv_plugin.workflow.rules`, shared with the benchmarks and examples.

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
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from resconv_plugin.fx.convert import convert
from resconv_plugin.deploy.fuse import fuse
from resconv_plugin.deploy.checkpoint import build_from_recipe, load, make_recipe, save
from resconv_plugin.pruning import FixedSetImportance, LayerPruner, channel_pruner
from resconv_plugin.pruning.planner import JointPlanner, PlanCandidate, remove_gates
from resconv_plugin.workflow.config import RESUME_IGNORED, CompressionConfig, ConfigError
from resconv_plugin.workflow.defaults import resolve_recipe
from resconv_plugin.workflow.distributed import Dist, resolve_device
from resconv_plugin.workflow.pretrained import create_baseline_model
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.fx.surgery import gated_modules
from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.latency_cost import LatencyCost
from resconv_plugin.workflow.report import stage_latencies, stage_table, write_report
from resconv_plugin._utils import atomic_file, check_module
from resconv_plugin.workflow.rules import finetune, remove_pruned, sparsity_steps
from resconv_plugin.workflow.training import StageSettings, check_amp, evaluate, train_stage
from resconv_plugin.data import BatchLoader, ImageData, build_datasets, calibration_batch, held_out_split

__all__ = ["compress", "Pipeline", "STAGES", "RESUME_IGNORED", "environment"]

log = logging.getLogger("resconv")

#: The stages, in the order they run.
STAGES = ("baseline", "convert", "sparsity", "prune", "channel_prune", "finetune", "fuse", "save")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def environment() -> Dict[str, Any]:
    import timm
    import torch_pruning

    from resconv_plugin._version import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "torch_pruning": torch_pruning.__version__, "resconv_plugin": __version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
            "threads": torch.get_num_threads()}


class Run:
    """The run's state on disk (``<output>/checkpoint.pt``) and in memory; the stages read and update it."""

    def __init__(self, config: CompressionConfig, dist: Dist) -> None:
        self.config, self.dist = config, dist
        self.out = Path(config.output)
        self.path = self.out / "checkpoint.pt"
        self.settings = config.resume_settings()
        self.model: Optional[nn.Module] = None
        self.state: Dict[str, Any] = {"settings": self.settings, "done": [], "records": [], "progress": None,
                                      "gamma_trace": [], "epochs_log": [], "removed": [], "resumed": [],
                                      "removal": None, "recipe": None, "weights": None}
        if self.path.exists() and not config.restart:
            self._resume()

    def _resume(self) -> None:
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        # a setting newer than the checkpoint's version compares as its default
        defaults = CompressionConfig().resume_settings()
        if "gate_ratio" not in saved["settings"]:  # a run saved when gate_ratio was called pruning_ratio
            saved["settings"]["gate_ratio"] = saved["settings"].pop("pruning_ratio", None)
        saved["settings"] = {**{k: v for k, v in defaults.items() if k not in saved["settings"]}, **saved["settings"]}
        differ = sorted((k for k in set(saved["settings"]) | set(self.settings)
                         if saved["settings"].get(k) != self.settings.get(k)),
                        key=lambda k: (k not in ("model", "data"), k))
        if differ:
            details = "; ".join(f"{k}: {saved['settings'].get(k)!r} -> {self.settings.get(k)!r}" for k in differ[:6])
            raise ConfigError(f"{self.out} holds a run with other settings ({len(differ)} differ: {details}"
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

    def save_model(self, model: nn.Module, path: Path) -> None:
        """``resconv_plugin.save`` with the run's model name and arguments (rank 0 only)."""
        if self.dist.main:
            save(model, path, model_name=self.config.model, model_kwargs=self.config.model_factory_kwargs())

    def save(self, progress: Optional[dict] = None) -> None:
        """Checkpoint (rank 0 writes, every rank waits)."""
        self.state["progress"] = progress
        if self.model is not None:
            self.state["recipe"] = make_recipe(self.model, model_name=self.config.model,
                                               model_kwargs=self.config.model_factory_kwargs())
            self.state["weights"] = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.dist.main:
            _atomic_torch_save(self.state, self.path)
        self.dist.barrier()

    def record(self, stage: str, model: nn.Module, data: ImageData, example: torch.Tensor, **extra: Any) -> None:
        """Top-1, FLOPs and params of ``model`` as deployed; that deployed copy goes to ``stages/<stage>.safetensors``
        (reloadable with ``resconv_plugin.load``; the latencies of all stages are measured together at the end)."""
        if self.dist.main:
            top1 = evaluate(model, data, workers=self.config.workers)
            plain = deployed(model)
            flops = count_flops(plain, example)
            self.save_model(plain, self.out / "stages" / f"{stage}.safetensors")
            entry = {"stage": stage, "top1": top1, "flops": int(flops.total), "params": int(flops.params),
                     "gates": len(gated_modules(model)), **extra}
            self.state["records"].append(entry)
            log.info("%s: top-1 %.2f%%, FLOPs %.2fM, params %.1fk", stage, top1, flops.total / 1e6,
                     flops.params / 1e3)
        self.state["records"] = self.dist.broadcast(self.state["records"])


class Pipeline:
    """The stages of one run (:data:`STAGES`), each a method, run in order and checkpointed after each.

    Example:
        >>> pipeline = Pipeline(CompressionConfig(model="cifar_resnet20", flops_reduction=0.4).validated())
        >>> report = pipeline.run()  # doctest: +SKIP
    """

    def __init__(self, config: CompressionConfig, dist: Optional[Dist] = None,
                 data: Optional[ImageData] = None, model: Optional[nn.Module] = None) -> None:
        self.config = config
        self.initial_model = model  # a model object to start from instead of timm.create_model(config.model)
        self.dist = dist or Dist()
        c = config
        torch.manual_seed(c.seed)  # the same initial weights in every process
        try:
            self.data = data if data is not None else build_datasets(
                c.data, c.data_dir, img_size=c.img_size, in_chans=c.in_chans, train_subset=c.train_subset,
                val_subset=c.val_subset, seed=c.seed)
        except ValueError as exc:  # the data settings do not fit the dataset found
            raise ConfigError(f"--data {c.data}: {exc}") from exc
        if c.num_classes is None:
            c.num_classes = self.data.num_classes
        elif c.num_classes < self.data.num_classes:
            raise ConfigError(f"--num-classes {c.num_classes} is fewer than the {self.data.num_classes} classes of "
                             f"{c.data}")
        c.in_chans = self.data.in_chans
        self.run_state = Run(c, self.dist)
        self.device = self.dist.device
        if c.latency_device:
            resolve_device(c.latency_device, "--latency-device")  # a wrong one fails here, before any work
        self.latency_cost()  # a runtime that cannot run here (not installed, no CUDA) fails here too
        self.cpu_example = torch.zeros(1, self.data.in_chans, self.data.img_size, self.data.img_size)
        self.example = self.cpu_example.to(self.device)
        # training images: no test image decides what goes
        self.calib = tuple(t.to(self.device) for t in calibration_batch(self.data, c.calibration_size, seed=c.seed))
        self.teacher: Optional[nn.Module] = None
        self.stages: Dict[str, Callable[[], None]] = {name: getattr(self, name) for name in STAGES}

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def latency_device(self) -> torch.device:
        """Where latency is measured (the budget's table and fit, the joint plan, the report's timings):
        ``--latency-device``, else the training device (on CUDA, batch-1 latency is launch-bound: a table timed on
        the CPU would not be the budget the run meets); ONNX Runtime and OpenVINO time on the CPU."""
        c = self.config
        if c.latency_device:
            return resolve_device(c.latency_device, "--latency-device")
        return torch.device("cpu") if c.latency_runtime in ("onnxruntime", "openvino") else self.device

    def latency_cost(self, repeats: int = 20) -> LatencyCost:
        """How the run times latency (:class:`~resconv_plugin.LatencyCost`): ``--latency-runtime``,
        ``--latency-batch-size``, ``--latency-threads`` on :attr:`latency_device`, in the run's memory format
        (PyTorch runtimes), ``repeats`` rounds (the budget's and the joint plan's 20, the report's
        ``--latency-repeats``).

        Raises:
            ConfigError: the runtime cannot time on this device or machine (e.g. ``tensorrt`` without CUDA).
            ImportError: the runtime's package is missing (the message names the pip extra).
        """
        c = self.config
        try:
            return LatencyCost(c.latency_runtime, batch_size=c.latency_batch_size, threads=c.latency_threads,
                               channels_last=c.channels_last and c.latency_runtime in ("eager", "compile"),
                               device=self.latency_device, repeats=repeats)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"--latency-runtime {c.latency_runtime}: {exc}") from exc

    @property
    def model(self) -> Optional[nn.Module]:
        return self.run_state.model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self.run_state.model = model

    def stage_settings(self, name: str, epochs: int, lr: float, **overrides: Any) -> StageSettings:
        """The training settings of stage ``name`` from the config (seed: config seed + the stage's index)."""
        c = self.config
        return StageSettings(name=name, epochs=epochs, lr=lr, batch_size=c.batch_size, opt=c.opt,
                             momentum=c.momentum, weight_decay=c.weight_decay, sched=c.sched,
                             warmup_epochs=min(c.warmup_epochs, max(epochs - 1, 0)), min_lr=c.min_lr,
                             smoothing=c.smoothing, seed=c.seed + STAGES.index(name), workers=c.workers,
                             progress=c.progress, amp=None if c.amp == "none" else c.amp,
                             channels_last=c.channels_last, divergence_factor=c.divergence_factor or None,
                             **overrides)

    def _distill_settings(self) -> Dict[str, float]:
        c = self.config
        return {"distill_alpha": c.distill_alpha if c.distill else 0.0, "distill_temperature": c.distill_temperature}

    def _progress(self, name: str) -> Tuple[Optional[dict], Callable[[Any], None]]:
        """Where an interrupted stage ``name`` stopped (or None), and the per-epoch checkpoint callback."""
        saved = self.run_state.state["progress"]
        resume = {k: v for k, v in saved.items() if k != "stage"} if (saved or {}).get("stage") == name else None

        def checkpoint(p) -> None:
            self.run_state.save({"stage": name, **p.to_dict()})

        return resume, checkpoint

    def _log_training(self, result) -> None:
        self.run_state.state["epochs_log"].extend(result.epochs_log)
        self.run_state.state["gamma_trace"].extend(result.gamma_trace)
        self.run_state.state.setdefault("restarts", []).extend(result.restarts)

    def _train(self, name: str, epochs: int, lr: float, pruner=None, **overrides: Any) -> None:
        resume, checkpoint = self._progress(name)
        self._log_training(train_stage(self.model, self.data, self.stage_settings(name, epochs, lr, **overrides),
                                       self.dist, pruner=pruner, teacher=self.teacher, resume=resume,
                                       on_epoch_end=checkpoint))

    def _load_teacher(self) -> None:
        if self.config.distill:
            self.teacher = load(self.run_state.out / "baseline.safetensors")

    def _record(self, stage: str, **extra: Any) -> None:
        self.run_state.record(stage, self.model, self.data, self.example, **extra)

    def _planner(self) -> JointPlanner:
        """The JointPlanner of the budget, scoring candidates by their short training (:meth:`_recovered_loss`)
        unless ``--joint-recovery-steps 0``."""
        c = self.config
        reduction = c.latency_reduction if c.latency_reduction is not None else c.flops_reduction
        return JointPlanner(self.model, self.example, reduction, calibration_inputs=self.calib[0],
                            calibration_targets=self.calib[1],
                            cost="latency" if c.latency_reduction is not None else "flops", importance=c.importance,
                            score=self._recovered_loss if c.joint_recovery_steps else None,
                            latency_cost=self.latency_cost())

    def _recovered_loss(self, candidate: PlanCandidate, model: nn.Module) -> float:
        """A joint candidate's score: ``model`` (built at the candidate's widths, gates kept) trained for
        ``--joint-recovery-steps`` steps the way the run trains the plan it picks (distilled; the candidate's layers
        faded out over the share of the steps that sparsity training's cap takes of the run's epochs, then
        removed), then its cross-entropy on training images held out from those steps. Every candidate sees the same
        batches and the same held-out images."""
        c = self.config
        batch = min(c.batch_size, len(self.data) // 2)
        choose = held_out_split(self.data, min(2048, len(self.data) // 4), train_size=c.joint_recovery_steps * batch,
                                seed=c.seed)
        per_epoch = max(1, len(choose) // batch)
        epochs = max(1, round(c.joint_recovery_steps / per_epoch))
        pruner = None
        if candidate.depth_names:
            steps = epochs * per_epoch
            share = c.sparsity_epochs / max(1, c.sparsity_epochs + c.finetune_epochs) * 0.75  # the cap's zero_at
            gates = len(gated_modules(model))
            pruner = LayerPruner(model, self.example, importance=FixedSetImportance(candidate.depth_names), reg=0.0,
                                 gate_ratio=len(candidate.depth_names) / gates, sparsity_steps=steps,
                                 zero_at=min(1.0, max(share, 1.0 / steps)))
        teacher = load(self.run_state.out / "baseline.safetensors").to(self.device) if c.distill else None
        settings = dataclasses.replace(self.stage_settings("convert", epochs, c.finetune_lr,
                                                           **self._distill_settings()), batch_size=batch,
                                       progress=False)
        train_stage(model, choose, settings, pruner=pruner, teacher=teacher)
        remove_gates(model, candidate.depth_names)
        loss = total = 0.0
        with torch.no_grad():
            model.eval()
            for x, y in BatchLoader(choose, False, 500, device=self.device):
                loss += torch.nn.functional.cross_entropy(model(x), y, reduction="sum").item()
                total += len(y)
        return loss / total

    def _depth_set(self) -> Optional[List[str]]:
        plan = self.run_state.state.get("joint_plan")
        return plan["best"]["depth_names"] if plan else None

    def make_pruner(self, sparsity_steps: Optional[int] = None) -> LayerPruner:
        """The LayerPruner of the config's budget and importance (with ``--channel-pruning auto``: the planned
        depth set)."""
        c, model = self.config, self.model
        budget = dict(threshold=c.threshold, gate_ratio=c.gate_ratio, flops_reduction=c.flops_reduction,
                      latency_reduction=c.latency_reduction)
        importance, reg = c.importance, c.reg
        depth_set = self._depth_set()
        if depth_set is not None:  # --channel-pruning auto: depth takes the planned set, channels the rest
            gates = len(gated_modules(model))
            importance = FixedSetImportance(depth_set)
            budget = dict(gate_ratio=len(depth_set) / gates) if depth_set else dict(threshold=0.0)
            reg = 0.0 if reg is None else reg

        def build(state: Optional[dict] = None) -> LayerPruner:
            return LayerPruner(model, self.example, importance=importance, reg=reg, **budget,
                               sparsity_steps=sparsity_steps, cap_start=c.cap_start,
                               calibration_inputs=self.calib[0], calibration_targets=self.calib[1],
                               ignored_layers=c.ignored_layers or None, latency_cost=self.latency_cost(),
                               state=state)

        if c.latency_reduction is None:
            pruner = build()
        else:  # measured latency differs per process: rank 0 measures, the others build from its tables and fit
            measured: List[LayerPruner] = []

            def measure() -> dict:  # with the preflight's latency table, when the budget is the depth pruner's
                tables = self.run_state.state.get("budget_tables") if depth_set is None else None
                measured.append(build(tables))
                return measured[0].state_dict()

            state = self.dist.run_on_main(measure)
            pruner = measured[0] if measured else build(state)
            if pruner.latency_fit is not None:
                self.run_state.state["latency_fit"] = pruner.latency_fit
            for r in (pruner.latency_fit or {}).get("rounds", []):
                log.info("latency budget: %d gates, table predicts %.3f, measured %.3f (goal scale %.3f)",
                         len(r["removed"]), r["predicted"], r["measured"], r["scale"])
            best = max((r["measured"] for r in (pruner.latency_fit or {}).get("rounds", [])), default=None)
            if best is not None and best < c.latency_reduction:
                log.warning("latency budget not met as measured: the closest set of gates removes %.3f of the "
                            "latency, %.3f asked (the per-gate latency table is noise next to each layer's share; "
                            "report.json latency_fit has every round)", best, c.latency_reduction)
        return pruner

    # -- the stages ----------------------------------------------------------------------------------------------
    def baseline(self) -> None:
        """Create the model (timm, optionally pretrained), train ``epochs``, save ``baseline.safetensors``."""
        c = self.config
        if self.model is None:
            self.model = (copy.deepcopy(self.initial_model) if self.initial_model is not None
                          else create_baseline_model(c, self.run_state.out, self.dist)).to(self.device)
            self.run_state.save()
        if c.epochs:
            self._train("baseline", c.epochs, c.lr, model_ema=c.model_ema, model_ema_decay=c.model_ema_decay,
                        mixup=c.mixup, cutmix=c.cutmix)
        self.run_state.save_model(self.model, self.run_state.out / "baseline.safetensors")
        self._record("baseline")

    def convert(self) -> None:
        """ResConv layers (or block gates); with ``--channel-pruning auto``, the joint depth / width plan."""
        c = self.config
        report = convert(self.model, self.example, level=c.level, init_gamma=c.init_gamma)
        log.info("converted %d layers (%s level); %d convs skipped", len(report.converted), report.level,
                 len(report.skipped))
        if c.channel_pruning == "auto":  # measured on rank 0's clock: every process follows the same plan
            planner = self._planner()  # built on every rank (no timing); rank 0 plans with it

            def plan_it() -> dict:
                plan = planner.plan()
                return {"target_rel": plan.target_rel, "best": dataclasses.asdict(plan.best),
                        "latency": self.latency_cost().as_dict() if c.latency_reduction is not None else None,
                        "candidates": [dataclasses.asdict(x) for x in plan.candidates],
                        "unreachable": plan.unreachable}

            plan = self.dist.run_on_main(plan_it)
            self.run_state.state["joint_plan"] = plan
            for label in plan["unreachable"]:
                log.info("joint plan: the %s candidate cannot reach the budget (channel pruning up to ratio 0.95)",
                         label)
            for x in plan["candidates"]:
                log.info("joint plan: %s: %d layers + channel ratio %.3f -> cost %.3f, score %.4g", x["kind"],
                         len(x["depth_names"]), x["channel_ratio"], x["cost_rel"], x["score"])
            best = plan["best"]
            log.info("joint plan: %s chosen (%d layers, channel ratio %.3f)", best["kind"], len(best["depth_names"]),
                     best["channel_ratio"])
            # trained at its final widths: the channels go now, the layers fade out in sparsity training
            self.model = planner.build(best["depth_names"], best["channel_ratio"]).to(self.device)

    def sparsity(self) -> None:
        """Sparsity training with the LayerPruner (budget cap, importance), distilled with ``--distill``."""
        c = self.config
        if c.sparsity_epochs:  # without: one-shot, prune() ranks the model as given (the latency table timed once)
            pruner = self.make_pruner(sparsity_steps(self.data, c.sparsity_epochs, c.batch_size))
            self._load_teacher()
            self._train("sparsity", c.sparsity_epochs, c.sparsity_lr, pruner=pruner, **self._distill_settings())
            self.teacher = None
        self._record("sparsity")

    def prune(self) -> None:
        """Remove the selected layers, and every other gate at exactly 0."""
        c = self.config
        annealed = c.sparsity_epochs > 0 and c.threshold is None  # the budget cap drove its set to exactly 0:
        # remove exactly that set, no re-ranking of a changed model
        # one-shot with a budget: the pruner chooses its set as it is built (one step of a budget cap), so that the
        # latency fit make_pruner() records is the one of the set removed
        pruner = None if annealed else self.make_pruner(1 if c.threshold is None else None)
        pruned = remove_pruned(self.model, self.example, pruner, calibration_inputs=self.calib[0],
                               ignored_layers=c.ignored_layers or None)
        self.run_state.state["removed"] = pruned.removed
        self.run_state.state["removal"] = str(pruned.report)
        log.info("prune: %s: %s", pruned.report, ", ".join(pruned.removed) or "nothing")
        self._record("pruned", removed=len(pruned.removed))

    def channel_prune(self) -> None:
        """torch-pruning on the depth-pruned model, before fine-tuning and fusion (``--channel-pruning``)."""
        c = self.config
        if not c.channel_pruning:
            return
        if c.channel_pruning == "auto":  # pruned at the plan's ratio before training (convert)
            self._record("channel_pruned", channel_ratio=self.run_state.state["joint_plan"]["best"]["channel_ratio"])
            return
        channel_pruner(self.model.eval(), self.example, pruning_ratio=c.channel_pruning, global_pruning=True).step()
        self._record("channel_pruned")

    def finetune(self) -> None:
        """Fine-tune with frozen gates, before fusion (``--finetune-epochs``; distilled with ``--distill``)."""
        c = self.config
        if not c.finetune_epochs:
            return
        self._load_teacher()
        resume, checkpoint = self._progress("finetune")
        settings = self.stage_settings("finetune", c.finetune_epochs, c.finetune_lr, model_ema=c.model_ema,
                                       model_ema_decay=c.model_ema_decay, **self._distill_settings())
        self._log_training(finetune(self.model, self.data, settings, self.dist, teacher=self.teacher, resume=resume,
                                    on_epoch_end=checkpoint))
        self.teacher = None
        self._record("finetuned")

    def fuse(self) -> None:
        """Every remaining gate into a plain conv."""
        with torch.no_grad():
            self.model = fuse(self.model.eval(), inplace=True)
        self._record("fused")

    def save(self) -> None:
        """``model.safetensors`` (reloadable with ``resconv_plugin.load`` in a fresh process)."""
        self.run_state.save_model(self.model, self.run_state.out / "model.safetensors")
        log.info("saved %s", self.run_state.out / "model.safetensors")

    # -- running -------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """Run (or resume) every stage not done yet; returns the report (also written to the output folder)."""
        state = self.run_state.state
        level = (state.get("recipe_defaults") or {}).get("level")  # a resumed run keeps the level it chose
        if "convert" not in state["done"] or level is None:
            level, state["budget_tables"] = self._preflight()
        self._use_recipe(level)
        for name in STAGES:
            if name in state["done"]:
                continue
            self.stages[name]()
            state["done"].append(name)
            self.run_state.save()
        return self._finish()

    def _preflight(self) -> Tuple[str, Optional[dict]]:
        """Fail before any training when the model cannot be converted, the budget cannot be met or the mixed
        precision cannot run on the device (checked on rank 0, a latency budget on the latency device; every process
        raises the same error); returns the gate level the model converts at (what ``--level auto`` decides) and,
        for a latency budget, the measured latency table (a LayerPruner state) that the sparsity stage's pruner
        then uses: measured once, so the stage cannot find unreachable what this check found reachable."""
        return self.dist.run_on_main(self._check_budget)

    def _check_budget(self) -> Tuple[str, Optional[dict]]:
        import timm

        c = self.config
        try:
            check_amp(None if c.amp == "none" else c.amp, self.device, option="--amp")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        probe = next((m for m in (self.model, self.initial_model) if m is not None), None)
        if probe is None:
            probe = timm.create_model(c.model, **c.model_factory_kwargs())
        probe = copy.deepcopy(probe).cpu()
        level = c.level
        try:
            level = convert(probe, self.cpu_example, level=c.level, init_gamma=c.init_gamma).level
            # the budget's reachability does not depend on the criterion: magnitude measures nothing
            check = LayerPruner(probe, self.cpu_example, importance="magnitude", threshold=c.threshold,
                                gate_ratio=c.gate_ratio, flops_reduction=c.flops_reduction,
                                latency_reduction=c.latency_reduction, latency_cost=self.latency_cost(),
                                ignored_layers=c.ignored_layers or None)
        except ValueError as exc:  # this model cannot take this config (no eligible conv, unreachable budget)
            hint = ""
            if c.level == "auto" and level == "block" and "unreachable" in str(exc):
                hint = (" (--level auto chose block gates, the measured best where a model has residual blocks; "
                        "layer gates reach further but collapsed at deep budgets in the benchmarks, e.g. "
                        "cifar_resnet56 at 0.35 of the latency: 14% top-1; ask for less, or pass --level layer)")
            raise ConfigError(f"{c.model}: {exc}{hint}") from exc
        return level, (check.state_dict() if c.latency_reduction is not None else None)

    def _use_recipe(self, level: str) -> None:
        """Fill the recipe fields left to the defaults (``--level auto``, ``--importance auto``, no
        ``--sparsity-epochs`` / ``--finetune-epochs``) with ``level``'s measured-best recipe; recorded in the report
        (``recipe``)."""
        self.config, filled = resolve_recipe(self.config, level)
        c = self.config
        self.run_state.state["recipe_defaults"] = {
            "level": level, "importance": c.importance, "sparsity_epochs": c.sparsity_epochs,
            "finetune_epochs": c.finetune_epochs, "from_defaults": filled}
        if filled:
            log.info("recipe: %s gates, %s importance, %d + %d epochs (sparsity + fine-tuning); defaults used for %s "
                     "(resconv_plugin.workflow.defaults)", level, c.importance, c.sparsity_epochs,
                     c.finetune_epochs, ", ".join(filled))

    def _finish(self) -> Dict[str, Any]:
        run, c = self.run_state, self.config
        records = run.state["records"]
        cost = self.latency_cost(c.latency_repeats)
        if self.dist.main:
            models = {r["stage"]: load(run.out / "stages" / f"{r['stage']}.safetensors") for r in records}
            log.info("timing the %d stages' models in turns (%s, %d rounds)", len(models), cost.describe(),
                     c.latency_repeats)
            timed = stage_latencies(models, self.cpu_example, cost=cost)
            for r, ms in zip(records, timed.values()):
                r["latency_ms"] = ms
        records = run.state["records"] = self.dist.broadcast(records)
        first, last = records[0], records[-1]
        summary = {"top1_change": last["top1"] - first["top1"], "flops_reduction": 1 - last["flops"] / first["flops"],
                   "params_reduction": 1 - last["params"] / first["params"],
                   "latency_reduction": 1 - last["latency_ms"] / first["latency_ms"],
                   "layers_removed": len(run.state["removed"])}
        report = {"settings": run.settings, "command": c.command, "environment": environment(),
                  "stages": records, "summary": summary, "removed": run.state["removed"],
                  "removal": run.state["removal"], "epochs": run.state["epochs_log"],
                  "gamma_trace": run.state["gamma_trace"], "resumed": run.state["resumed"],
                  "restarts": run.state.get("restarts", []),
                  "recipe": run.state.get("recipe_defaults"),
                  "latency_fit": run.state.get("latency_fit"), "joint_plan": run.state.get("joint_plan"),
                  "latency_device": str(self.latency_device), "latency": cost.as_dict(),
                  "model_file": str(run.out / "model.safetensors")}
        if self.dist.main:
            write_report(report, run.out, plots=c.plots)
            print("\n" + stage_table(records, latency_device=self.latency_device, latency=cost.as_dict()))
            print(f"\n{c.model} on {c.data}: top-1 {first['top1']:.2f}% -> {last['top1']:.2f}% "
                  f"({summary['top1_change']:+.2f}), FLOPs -{100 * summary['flops_reduction']:.1f}%, params "
                  f"-{100 * summary['params_reduction']:.1f}%, latency ({cost.describe()}) "
                  f"{-100 * summary['latency_reduction']:+.1f}%, "
                  f"{summary['layers_removed']} layers removed.\nreport: {run.out / 'report.md'}; model: "
                  f"{run.out / 'model.safetensors'}", flush=True)
        return report


def compress(config: CompressionConfig, dist: Optional[Dist] = None, data: Optional[ImageData] = None,
             model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Run (or resume: the same config and output folder) the whole compression workflow; returns the report
    (also written to ``config.output``: ``report.json``, ``report.md``, ``model.safetensors``, ``stages/``).

    Args:
        config: what to do (checked and completed with :meth:`CompressionConfig.validated`).
        dist: this process's place in a torchrun run (default: a single process).
        data: the dataset (default: built from ``config.data``, ``data_dir``, subsets, ``seed``).
        model: the model to start from (e.g. your trained network; not changed: the run works on a copy); default:
            ``timm.create_model(config.model, ...)`` with ``config.pretrained_file``. ``config.model`` must still name
            its timm architecture: saved files rebuild it from that name.

    Example:
        >>> from resconv_plugin.workflow import CompressionConfig, compress
        >>> report = compress(CompressionConfig(model="cifar_resnet20", flops_reduction=0.4, epochs=4,
        ...                                     train_subset=20000, output="runs/r20"))  # doctest: +SKIP
        >>> report["summary"]["flops_reduction"]  # doctest: +SKIP
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    if model is not None:
        check_module(model)
    dist = dist or Dist()
    return Pipeline(config.validated(dist.world), dist, data, model).run()
