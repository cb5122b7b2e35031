"""``JointPruner``: one latency (or FLOPs) budget, split between removing layers and removing channels by measurement.

For each candidate split ``s`` (the share of the budget that depth pruning takes, e.g. 0, 0.25, ..., 1), on a copy of
the model:

1. depth: the gates of least importance whose removal saves ``s`` of the budget are set to 0 and removed
   (``LayerPruner.rank()``: the same criteria and selection as the depth pruner; capped at what depth can reach);
2. width: torch-pruning's ``MetaPruner`` (global, ``GroupMagnitudeImportance`` by default) prunes channels of what is
   left, its ``pruning_ratio`` bisected until the cost of the deployed model meets the whole budget;
3. recovery (with ``recovery_batches`` and ``recovery_steps``): the pruned copy is trained for that many SGD steps,
   distilled from the unpruned model, on the same batches in the same order for every candidate;
4. score: the task loss on the calibration batch (with ``calibration_targets``, else the KL divergence from the
   unpruned model's outputs). One-shot (no recovery): with the BatchNorm statistics as they are and re-estimated on
   the batch (the unpruned reference treated the same way), the lower of the two. After recovery: as the trained
   copy would be deployed, with the statistics its training left.

The split with the lowest score wins. ``s = 0`` is pure channel pruning and ``s = 1`` pure depth pruning (topped up
with channels only when depth alone cannot reach the budget), so the choice includes both.

Why recovery: at small budgets one-shot scores rank wrecks. On cifar_resnet20 at 0.45 of the latency every
candidate's calibration loss was near chance before training (2.4-3.3 nats, chance 2.3) and the lowest was pure
channel pruning, which after the full schedule lost 14.9 pt where pure depth lost 7.4; after 200-300 distilled
steps pure channel pruning scores clearly worst (benchmarks/results/joint_proxy.md). Scoring after recovery with
the statistics re-estimated on the scored batch itself flattered narrow channel-pruned candidates, hence the
deployed statistics.

Train the chosen plan afterwards (``LayerPruner`` budget-driven sparsity with
``importance=FixedSetImportance(plan.best.depth_names)``, then ``channel_pruner`` with ``plan.best.channel_ratio``,
then fine-tuning), or call :meth:`JointPruner.apply` for the one-shot result.

Costs: ``"latency"`` (the deployed model timed in turns with the deployed baseline on this machine, batch of the
example input, on ``latency_device`` in the memory format of ``latency_channels_last``), ``"flops"``
(deterministic), or any ``callable(deployed_model) -> float``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from resconv_plugin.deploy.fold import deployed
from resconv_plugin.distill import DistillationLoss
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.measure.latency import interleaved_latencies
from resconv_plugin.fx.surgery import gated_modules, remove
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, eval_mode
from resconv_plugin.pruning.calibration import calibration_loss, output_divergence, recalibrate_batchnorm
from resconv_plugin.pruning.bisect import bisect_ratio
from resconv_plugin.pruning.importance import GateImportance
from resconv_plugin.pruning.select import set_saving

__all__ = ["JointPruner", "JointPlan", "SplitCandidate"]

Cost = Union[str, Callable[[nn.Module], float]]


@dataclass
class SplitCandidate:
    """One split of the budget, measured.

    Attributes:
        depth_share: the share of the budget depth pruning was asked to take.
        depth_names: the gates removed.
        channel_ratio: torch-pruning's ``pruning_ratio`` that met the rest (0 when depth alone met it).
        cost_rel: the deployed model's cost relative to the deployed baseline's.
        score: the proxy (lower is better): calibration loss (or divergence), after the recovery steps when the
            pruner has them.
        oneshot_score: the same before any recovery (BatchNorm as is or re-estimated, the lower).
        recovery_steps: the training steps taken before ``score`` (0: ``score`` is the one-shot score).
    """

    depth_share: float
    depth_names: List[str]
    channel_ratio: float
    cost_rel: float
    score: float
    oneshot_score: Optional[float] = None
    recovery_steps: int = 0


@dataclass
class JointPlan:
    """Every candidate split that met the budget, the best one, and the shares that could not meet it.

    Attributes:
        target_rel: the cost to reach, relative to the unpruned model's.
        candidates: the splits measured.
        unreachable: the depth shares whose split could not reach ``target_rel`` (channel pruning up to ratio 0.95
            on top of their layers; e.g. pure width at a latency that only removing layers reaches).
    """

    target_rel: float
    candidates: List[SplitCandidate] = field(default_factory=list)
    unreachable: List[float] = field(default_factory=list)

    @property
    def best(self) -> SplitCandidate:
        """The candidate with the lowest score (ties: the larger depth share). A score that is not finite (its
        recovery steps diverged) ranks last: NaN compares false with everything and would otherwise win or lose by
        its position in the list."""
        def rank(c: SplitCandidate) -> tuple:
            finite = math.isfinite(c.score)
            return (not finite, c.score if finite else 0.0, -c.depth_share)

        return min(self.candidates, key=rank)


class JointPruner:
    """Choose how much of one budget comes from removing layers and how much from removing channels.

    Args:
        model: a converted model (ResConv layers and / or gated blocks), not changed by :meth:`plan`.
        example_inputs: the deployment input (batch size of the latency measurement, input of FLOP counts).
        reduction: the fraction of the cost to remove, in (0, 1).
        calibration_inputs: a batch of real inputs for importance, BatchNorm re-estimation and the score.
        calibration_targets: their labels (task loss); without, the divergence from the unpruned outputs.
        cost: ``"latency"``, ``"flops"`` or ``callable(deployed_model) -> float``.
        depth_shares: the candidate splits.
        importance: the depth criterion (as ``LayerPruner(importance=...)``).
        channel_importance: torch-pruning importance for the channel part (default ``GroupMagnitudeImportance``).
        round_to: torch-pruning's ``round_to`` for the channel part.
        latency_repeats: timing rounds per measurement with ``cost="latency"``.
        latency_device: the device latency is measured on (the one you deploy to; default: the example inputs'
            device), as ``LayerPruner(latency_device=...)``.
        latency_channels_last: time the models in channels-last memory format.
        tolerance: the channel ratio is bisected until the cost is within this fraction below the target.
        recovery_batches: training batches ``(inputs, targets)`` to train each candidate on before it is scored,
            e.g. a ``DataLoader``; iterated from the start for every candidate (so it must be re-iterable, not an
            iterator), and again when it runs out.
        recovery_steps: SGD steps per candidate (momentum 0.9, weight decay 5e-4, ``recovery_lr`` reached by a
            linear warm-up over the first tenth of the steps, then decayed to 0 on a cosine), distilled from the
            unpruned model (``DistillationLoss``, alpha 0.5, T 4); 0: one-shot scores.
        recovery_lr: the initial learning rate of those steps.
        recovery_fade: the share of ``recovery_steps`` over which a candidate's layers are faded out (their gates
            clamped under a cap falling linearly to 0, as budget-driven sparsity training does) before they are
            removed and its channels pruned; 0: removed at once, all the steps after (:meth:`recover_faded`).

    Example:
        >>> import torch, resconv_plugin
        >>> model = resconv_plugin.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
        >>> x = torch.randn(64, 1, 28, 28)
        >>> plan = JointPruner(model, x[:1], 0.4, calibration_inputs=x, cost="flops").plan()  # doctest: +SKIP
        >>> plan.best.depth_share, plan.best.cost_rel <= 0.6  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, reduction: float, *,
                 calibration_inputs: ExampleInputs, calibration_targets: Optional[torch.Tensor] = None,
                 cost: Cost = "latency", depth_shares: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                 importance: Union[str, GateImportance] = "removal", channel_importance=None,
                 round_to: Optional[int] = None, latency_repeats: int = 20, tolerance: float = 0.02,
                 recovery_batches: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None,
                 recovery_steps: int = 0, recovery_lr: float = 0.02, recovery_fade: float = 0.0,
                 latency_device: Union[str, torch.device, None] = None, latency_channels_last: bool = False) -> None:
        self.model = check_module(model)
        self.example_inputs = as_input_tuple(example_inputs)
        self.calibration_inputs = as_input_tuple(calibration_inputs)
        self.calibration_targets = calibration_targets
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0.0 < reduction < 1.0:
            raise ValueError(f"reduction must be in (0, 1), got {reduction!r}")
        if not (cost in ("latency", "flops") or callable(cost)):
            raise ValueError(f"cost must be 'latency', 'flops' or a callable(deployed_model) -> float, got {cost!r}")
        shares = list(depth_shares)
        if not shares or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0
                             for s in shares):
            raise ValueError(f"depth_shares must be fractions in [0, 1], got {depth_shares!r}")
        if not gated_modules(model):
            raise ValueError(f"{type(model).__name__} has no gates: call resconv_plugin.convert(model, x) first")
        if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) or recovery_steps < 0:
            raise ValueError(f"recovery_steps must be a non-negative int, got {recovery_steps!r}")
        if recovery_steps and recovery_batches is None:
            raise ValueError(f"recovery_steps={recovery_steps} needs recovery_batches (training batches "
                             "(inputs, targets), e.g. a DataLoader)")
        if recovery_batches is not None and (not isinstance(recovery_batches, Iterable)
                                             or iter(recovery_batches) is recovery_batches):
            raise TypeError(f"recovery_batches must be re-iterable (a DataLoader, a list of (inputs, targets)), got "
                            f"{type(recovery_batches).__name__}: every candidate is trained on the same batches")
        if isinstance(recovery_lr, bool) or not isinstance(recovery_lr, (int, float)) or recovery_lr <= 0:
            raise ValueError(f"recovery_lr must be a positive number, got {recovery_lr!r}")
        if (isinstance(recovery_fade, bool) or not isinstance(recovery_fade, (int, float))
                or not 0.0 <= recovery_fade < 1.0):
            raise ValueError(f"recovery_fade must be a fraction in [0, 1), got {recovery_fade!r}")
        self.recovery_batches, self.recovery_steps, self.recovery_lr = recovery_batches, recovery_steps, recovery_lr
        self.recovery_fade = float(recovery_fade)
        self.reduction, self.cost, self.depth_shares = float(reduction), cost, shares
        self.importance, self.channel_importance, self.round_to = importance, channel_importance, round_to
        self.latency_repeats, self.tolerance = latency_repeats, tolerance
        self.latency_device = torch.device(latency_device) if latency_device is not None else None
        self.latency_channels_last = bool(latency_channels_last)
        self._base = deployed(model)
        self._timed_base: Optional[nn.Module] = None  # the deployed baseline as timed (device, memory format)
        self._references = self._outputs(model)
        self._probe = None  # the LayerPruner that ranks the gates for every share (built on first use)
        self.last_search = None  # the RatioSearch of the last meet() (every try, for the report)
        self._depth_cost = "latency" if cost == "latency" else "flops"  # its budget (a callable cost: FLOPs)

    # ------------------------------------------------------------------------------------------------ costs
    def cost_rel(self, candidate: nn.Module) -> float:
        """The cost of ``candidate`` (any model; measured as deployed) relative to the deployed baseline's."""
        plain = deployed(candidate)
        if callable(self.cost):
            return self.cost(plain) / self.cost(self._base)
        if self.cost == "flops":
            return count_flops(plain, self.example_inputs).total / count_flops(self._base, self.example_inputs).total
        device = self.latency_device or self.example_inputs[0].device
        fmt = torch.channels_last if self.latency_channels_last else torch.contiguous_format
        x = tuple((t.contiguous(memory_format=fmt) if t.dim() == 4 else t).to(device) for t in self.example_inputs)
        if self._timed_base is None:  # a copy only where the baseline is timed elsewhere or in another format
            moved = device != self.example_inputs[0].device or self.latency_channels_last
            self._timed_base = copy.deepcopy(self._base).to(device, memory_format=fmt) if moved else self._base
        plain, base = plain.to(device, memory_format=fmt), self._timed_base
        times = interleaved_latencies({"c": lambda: plain(*x), "b": lambda: base(*x)}, repeats=self.latency_repeats,
                                      device=device)
        return times["c"] / times["b"]

    # ------------------------------------------------------------------------------------------------ parts
    def _layer_probe(self):
        """The LayerPruner that chooses the layers of every share, on a copy of the model that stays unpruned.

        One for all shares, since ``rank()`` leaves its model unchanged: its latency table (every gate's removal
        timed) and the gates' importance (one calibration forward per gate for ``"removal"``), together most of the
        depth side's time (cifar_resnet56: 47 s and 88 s of 152 s per share on a 2-core CPU), are measured once.
        """
        from resconv_plugin.pruning.pruner import LayerPruner

        if self._probe is None:
            budget = {f"{self._depth_cost}_reduction": 0.0}
            probe = LayerPruner(copy.deepcopy(self.model), self.example_inputs, importance=self.importance, **budget,
                                calibration_inputs=self.calibration_inputs,
                                calibration_targets=self.calibration_targets, latency_device=self.latency_device,
                                latency_channels_last=self.latency_channels_last)
            measure, remembered = probe.scores, {}

            def scores(removed: Sequence[str] = ()) -> dict:
                key = tuple(sorted(removed))
                if key not in remembered:
                    remembered[key] = measure(removed)
                return dict(remembered[key])

            probe.scores = scores  # the same model for every share: the same importance
            self._probe = probe
        return self._probe

    def _depth(self, share: float) -> tuple:
        model = copy.deepcopy(self.model)
        if share <= 0:
            return model, []
        probe = self._layer_probe()
        saved, total = probe.savings(self._depth_cost)
        fraction = min(share * self.reduction, set_saving(saved, probe.gates) / total * 0.999)
        setattr(probe, f"{self._depth_cost}_reduction", fraction)
        chosen = probe.rank()
        _remove_layers(model, chosen)
        return model, chosen

    def prune_channels(self, model: nn.Module, ratio: float) -> nn.Module:
        """A copy of ``model`` (unfused: its BatchNorms stay, as in the training workflow) with channels pruned at
        torch-pruning ``pruning_ratio`` ``ratio`` (global, this pruner's channel importance and ``round_to``): the
        same ratio on the same weights gives the same structure, so a ratio chosen by :meth:`meet` in one process
        can be applied in another."""
        import torch_pruning as tp

        from resconv_plugin.pruning.channels import channel_pruner

        pruned = copy.deepcopy(model).eval()
        if ratio <= 0:
            return pruned
        kwargs = {"round_to": self.round_to} if self.round_to else {}
        importance = self.channel_importance or tp.importance.GroupMagnitudeImportance()
        channel_pruner(pruned, self.example_inputs, tp.pruner.MetaPruner, importance=importance, pruning_ratio=ratio,
                       global_pruning=True, **kwargs).step()
        return pruned.eval()

    def meet(self, model: nn.Module, target: Optional[float] = None, strict: bool = True) -> tuple:
        """Channel-prune a copy of ``model`` (e.g. the depth-pruned, trained one) until its cost relative to this
        pruner's baseline is at most ``target`` (default: ``1 - reduction``), within ``tolerance`` below it
        (:func:`~resconv_plugin.pruning.bisect_ratio`; with ``cost="latency"`` each try is timed three times and read
        at the median); returns ``(model, ratio, cost_rel)``.

        Args:
            strict: raise a ``ValueError`` when no ratio up to 0.95 reaches ``target``; ``False``: return the
                cheapest try instead (after training, a measured latency may miss by timing noise what the plan met:
                better the closest model than none).
        """
        target = 1.0 - self.reduction if target is None else target
        search = bisect_ratio(lambda ratio: self.prune_channels(model, ratio), self.cost_rel, target,
                              tolerance=self.tolerance, confirm=3 if self.cost == "latency" else 1)
        self.last_search = search
        if not search.met and strict:
            raise ValueError(f"channel pruning up to ratio 0.95 does not reach {target:.3f} of the cost")
        return search.model, search.ratio, search.cost_rel

    def _outputs(self, model: nn.Module) -> tuple:
        """Outputs on the calibration batch as the model is, and after re-estimating its BatchNorm statistics."""
        with eval_mode(model), torch.no_grad():
            raw = model(*self.calibration_inputs)
        model = copy.deepcopy(model)
        recalibrate_batchnorm(model, self.calibration_inputs)
        with eval_mode(model), torch.no_grad():
            return raw, model(*self.calibration_inputs)

    def _loss(self, reference: object, out: object) -> float:
        return (calibration_loss(out, self.calibration_targets) if self.calibration_targets is not None
                else output_divergence(reference, out))

    def score(self, candidate: nn.Module, recovered: bool = False) -> float:
        """The proxy (lower is better): the calibration loss, or the divergence from the unpruned model's outputs.

        One-shot (``recovered=False``): of the candidate as it is and after BatchNorm re-estimation (each against the
        unpruned model treated the same way), whichever is lower: re-estimation repairs what channel pruning shifts,
        and an exact removal needs none (re-estimating would only move the statistics of layers that were the
        identity). After recovery training (``recovered=True``): as it is, with the statistics its training left.
        """
        if recovered:
            with eval_mode(candidate), torch.no_grad():
                return self._loss(self._references[0], candidate(*self.calibration_inputs))
        return min(self._loss(reference, out) for reference, out in zip(self._references, self._outputs(candidate)))

    def recover(self, candidate: nn.Module) -> nn.Module:
        """Train ``candidate`` in place for ``recovery_steps`` distilled SGD steps on ``recovery_batches`` (the
        same batches in the same order for every candidate); its modules' training flags are restored after."""
        self._train(candidate, self.recovery_steps)
        return candidate

    def recover_faded(self, depth_names: Sequence[str], channel_ratio: float) -> nn.Module:
        """The candidate ``(depth_names, channel_ratio)`` trained as the pipeline trains a plan, in
        ``recovery_steps`` steps: a copy of the unpruned model is trained while the gates of ``depth_names`` are
        clamped to ``[0, cap]``, ``cap`` falling linearly from 1 to 0 over the first ``recovery_fade`` of the steps
        (the budget cap of sparsity training); then those layers are removed, the channels pruned at
        ``channel_ratio``, and the rest of the steps recover it. Without layers to fade, :meth:`recover` on the
        channel-pruned model (all the steps after pruning)."""
        fade = int(round(self.recovery_fade * self.recovery_steps)) if depth_names else 0
        model = copy.deepcopy(self.model)
        if fade:
            gates = [gated_modules(model)[name] for name in depth_names]

            def clamp(step: int) -> None:
                cap = max(0.0, 1.0 - step / fade)
                with torch.no_grad():
                    for gate in gates:
                        gate.gamma.clamp_(0.0, cap)

            self._train(model, fade, after_step=clamp)
        _remove_layers(model, depth_names)
        model = self.prune_channels(model, channel_ratio)
        self._train(model, self.recovery_steps - fade)
        return model

    def _train(self, model: nn.Module, steps: int, after_step: Optional[Callable[[int], None]] = None) -> None:
        """``steps`` distilled SGD steps on ``recovery_batches`` from their start (warm-up, cosine to 0), in place;
        ``after_step(n)`` after the n-th optimiser step. Training flags are restored after."""
        if not steps:
            return
        loss_fn = DistillationLoss(self._base)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.recovery_lr, momentum=0.9, weight_decay=5e-4)
        # warmed up: a freshly pruned deep net blows up at the full rate in its first updates (cifar_resnet56 with
        # 25 of 52 layers removed: NaN within 200 steps at 0.02 without it); decayed to 0: the score reads a
        # settled model, not the noise of the last steps at a high rate
        warmup = max(1, steps // 10)

        def rate(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
        done = 0
        with eval_mode(model), torch.enable_grad():  # training, also when called under no_grad
            model.train()
            while done < steps:
                before = done
                for batch in self.recovery_batches:
                    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                        raise TypeError(f"recovery_batches must yield (inputs, targets) pairs, got "
                                        f"{type(batch).__name__}")
                    x, y = batch
                    loss = loss_fn(model(x), y, x)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    done += 1
                    if after_step is not None:
                        after_step(done)
                    if done == steps:
                        break
                if done == before:
                    raise ValueError("recovery_batches yielded no batch")
        opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------ plan
    def plan(self) -> JointPlan:
        """Measure every candidate split (see the module docstring) and return them all with the best.

        A split that cannot reach the budget is listed in :attr:`JointPlan.unreachable` and not scored.

        Raises:
            ValueError: no split reaches the budget.
        """
        target = 1.0 - self.reduction
        plan = JointPlan(target_rel=target)
        for share in self.depth_shares:
            depth_model, names = self._depth(share)
            try:
                model, ratio, rel = self.meet(depth_model, target)
            except ValueError:
                plan.unreachable.append(share)
                continue
            oneshot = self.score(model)
            if not self.recovery_steps:
                score = oneshot
            elif self.recovery_fade and names:
                score = self.score(self.recover_faded(names, ratio), recovered=True)
            else:
                score = self.score(self.recover(model), recovered=True)
            plan.candidates.append(SplitCandidate(depth_share=share, depth_names=names, channel_ratio=ratio,
                                                  cost_rel=rel, score=score, oneshot_score=oneshot,
                                                  recovery_steps=self.recovery_steps))
        if not plan.candidates:
            raise ValueError(f"no split of the budget reaches {target:.3f} of the cost (depth shares "
                             f"{list(self.depth_shares)}, channel pruning up to ratio 0.95 on top of each)")
        return plan

    def apply(self, split: SplitCandidate) -> nn.Module:
        """The one-shot pruned model of ``split`` (unfused: fine-tune it, then ``fuse``)."""
        model = copy.deepcopy(self.model)
        _remove_layers(model, split.depth_names)
        return self.prune_channels(model, split.channel_ratio)


def _remove_layers(model: nn.Module, names: Sequence[str]) -> None:
    """Set the gates ``names`` of ``model`` to 0 and remove them (exact: a gate at 0 is the identity), in place."""
    with torch.no_grad():
        gates = gated_modules(model)
        for name in names:
            gates[name].gamma.zero_()
    remove(model, list(names))
