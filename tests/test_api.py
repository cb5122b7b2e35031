"""The API reads like torch-pruning and timm: names of our own where the behaviour differs, one meaning per option
name, ``regularize()`` without an attached optimizer, a top-level namespace of what users call, and the previous
release's names still working for one release with a FutureWarning that names their successor."""

import copy
import gc
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

import resconv_plugin
from resconv_plugin import (GateImportance, GateMagnitudeImportance, GateRemovalImportance, GateTaylorImportance,
                            LayerPruner)
from resconv_plugin.pruning import given_budget
from resconv_plugin.workflow import CompressionConfig, ConfigError


def small_net(seed: int = 0) -> nn.Module:
    """Three eligible 3x3 conv + BN layers (three ResConv gates) between a stem and a linear head."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.fixture
def converted():
    model, x = small_net(), torch.randn(8, 1, 6, 6)
    resconv_plugin.convert(model, x[:1])
    return model, x, torch.randint(0, 3, (8,))


# --------------------------------------------------------------------------------------------- importance
def test_importance_classes_have_names_of_their_own():
    ours = {GateMagnitudeImportance, GateRemovalImportance, GateTaylorImportance}
    assert all(issubclass(c, GateImportance) for c in ours)
    assert not {c.__name__ for c in ours | {GateImportance}} & set(dir(tp.importance))  # no torch-pruning name


@pytest.mark.parametrize("module", ["resconv_plugin", "resconv_plugin.pruning", "resconv_plugin.pruning.importance"])
@pytest.mark.parametrize("old, new", [("MagnitudeImportance", GateMagnitudeImportance),
                                      ("RemovalImportance", GateRemovalImportance),
                                      ("TaylorImportance", GateTaylorImportance)])
def test_the_previous_importance_names_warn_and_still_work(module, old, new):
    namespace = sys.modules[module]
    with pytest.warns(FutureWarning, match=f"{module}.{old} is deprecated .* use .*{new.__name__}"):
        assert getattr(namespace, old) is new
    assert old not in namespace.__all__


@pytest.mark.parametrize("importance", [tp.importance.GroupMagnitudeImportance(p=2), tp.importance.TaylorImportance(),
                                        tp.importance.BNScaleImportance()], ids=lambda i: type(i).__name__)
def test_a_torch_pruning_importance_is_refused_saying_what_to_pass(converted, importance):
    model, x, _ = converted
    assert isinstance(importance, tp.importance.Importance)
    with pytest.raises(TypeError, match=r"is a torch-pruning importance: it scores channel groups.*'magnitude'.*"
                                        r"GateMagnitudeImportance\(\), GateTaylorImportance\(\)"):
        LayerPruner(model, x[:1], importance=importance, gate_ratio=0.3)
    with pytest.raises(TypeError, match="importance must be one of .* or a GateImportance instance, got int"):
        LayerPruner(model, x[:1], importance=3)


def test_our_importance_objects_and_names_are_taken(converted):
    model, x, _ = converted
    for importance in ("magnitude", GateMagnitudeImportance(), GateRemovalImportance(), GateTaylorImportance()):
        pruner = LayerPruner(model, x[:1], importance=importance, gate_ratio=0.34, calibration_inputs=x)
        assert len(pruner.select()) == 1


# ------------------------------------------------------------------------------------------------ options
def test_gate_ratio_counts_gates_and_pruning_ratio_is_its_deprecated_name(converted):
    model, x, _ = converted
    with torch.no_grad():
        for i, gate in enumerate(resconv_plugin.gated_modules(model).values()):
            gate.gamma.fill_(1.0 - 0.1 * i)
    pruner = LayerPruner(model, x[:1], gate_ratio=2 / 3)
    assert pruner.gate_ratio == pytest.approx(2 / 3) and pruner.select() == ["9", "6"]  # the two smallest gates
    with pytest.warns(FutureWarning, match=r"pruning_ratio .* is deprecated .* use gate_ratio"):
        old = LayerPruner(model, x[:1], pruning_ratio=2 / 3)
    assert old.gate_ratio == pruner.gate_ratio and old.select() == pruner.select()
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="pass gate_ratio only"):
        LayerPruner(model, x[:1], gate_ratio=0.5, pruning_ratio=0.5)
    with pytest.warns(FutureWarning, match="use gate_ratio"):
        assert given_budget(pruning_ratio=0.3, threshold=None) == ("gate_ratio", 0.3)
    with pytest.raises(ValueError, match="unknown budget channel_ratio"):
        given_budget(channel_ratio=0.3)


def test_the_workflow_option_is_gate_ratio_too():
    config = CompressionConfig(model="cifar_resnet20", gate_ratio=0.25).validated()
    assert config.budget() == ("gate_ratio", 0.25)
    with pytest.warns(FutureWarning, match=r"pruning_ratio \(--pruning-ratio\) is deprecated .* gate_ratio"):
        old = CompressionConfig(model="cifar_resnet20", pruning_ratio=0.25).validated()
    assert (old.gate_ratio, old.pruning_ratio) == (0.25, None) and old.resume_settings() == config.resume_settings()
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="give --gate-ratio only"):
        CompressionConfig(model="cifar_resnet20", gate_ratio=0.25, pruning_ratio=0.25).validated()


# ------------------------------------------------------------------------------- regularize() as torch-pruning
def train(model, x, y, pruner, optimizer, steps, distractor=None):
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize(model)
        if distractor is not None:
            distractor.step()  # an optimizer that holds no gate: not the one the proximal step follows
        optimizer.step()


def test_regularize_without_an_optimizer_drives_the_gates_down(converted):
    """torch-pruning's loop (``loss.backward(); pruner.regularize(model); optimizer.step()``) with no ``attach``: the
    proximal step follows the optimizer that steps the gates, at its learning rate, exactly as with ``optimizer=``,
    and drives the gates to exactly 0."""
    model, x, y = converted
    twin = copy.deepcopy(model)
    free = LayerPruner(model, x[:1], reg=2.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    train(model, x, y, free, opt, 4, distractor=other)
    gammas = list(free.gates.values())
    assert all(g < 1.0 - 0.05 * 2.0 * 3 for g in gammas)  # four proximal steps of lr * reg = 0.1 (and the task)

    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    attached = LayerPruner(twin, x[:1], reg=2.0, optimizer=twin_opt)
    train(twin, x, y, attached, twin_opt, 4)
    assert list(attached.gates.values()) == pytest.approx(gammas, abs=1e-6)  # the same as with optimizer=

    train(model, x, y, free, opt, 8)
    assert set(free.gates.values()) == {0.0} and free.steps_done == 12
    assert all(not opt.state[g.gamma]["momentum_buffer"].any() for g in resconv_plugin.gated_modules(model).values())
    assert len(free.step()) == 3 and free.last_step.max_abs_change == 0.0


def test_a_budget_without_an_optimizer(converted):
    """The budget cap also acts after the optimizer's step: without ``attach`` the selected gates reach 0 by
    ``zero_at`` and their removal is exact."""
    model, x, y = converted
    pruner = LayerPruner(model, x[:1], gate_ratio=2 / 3, importance="removal", calibration_inputs=x,
                         sparsity_steps=8)
    chosen = pruner.select()
    train(model, x, y, pruner, torch.optim.Adam(model.parameters(), lr=1e-2), 8)
    assert pruner.budget_cap == 0.0 and all(pruner.gates[n] == 0.0 for n in chosen)
    assert sorted(pruner.step()) == sorted(chosen) and pruner.last_step.max_abs_change == 0.0


def test_the_optimizer_hook_goes_with_the_pruner(converted):
    model, x, y = converted
    gc.collect()  # the pruners of earlier tests
    before = len(_global_optimizer_post_hooks)
    pruner = LayerPruner(model, x[:1])
    train(model, x, y, pruner, torch.optim.SGD(model.parameters(), lr=0.01), 1)
    assert len(_global_optimizer_post_hooks) == before + 1
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.01))  # a named optimizer replaces the search
    assert len(_global_optimizer_post_hooks) == before
    train(model, x, y, LayerPruner(model, x[:1]), torch.optim.SGD(model.parameters(), lr=0.01), 1)
    gc.collect()
    assert len(_global_optimizer_post_hooks) == before  # the unreferenced pruner took its hook along


# ---------------------------------------------------------------------------------------------- namespace
def test_create_resconv_model_is_not_timm_create_model():
    import timm

    assert resconv_plugin.create_resconv_model is not timm.create_model
    assert "create_model" not in resconv_plugin.__all__
    for module in ("resconv_plugin", "resconv_plugin.models", "resconv_plugin.models.create"):
        with pytest.warns(FutureWarning, match="create_model is deprecated .* use .*create_resconv_model"):
            assert getattr(sys.modules[module], "create_model") is resconv_plugin.create_resconv_model


TOP_LEVEL = {"convert", "create_resconv_model", "ResConv", "BlockGate", "ConversionReport", "gated_modules",
             "freeze_gates", "LayerPruner", "JointPlanner", "GateImportance", "GateMagnitudeImportance",
             "GateRemovalImportance", "GateTaylorImportance", "fuse", "deployed", "save", "load", "export_onnx",
             "count_flops", "FlopReport", "count_params", "median_latency", "interleaved_latencies", "compress",
             "__version__"}
MOVED = {"identity_compatibility": "nn", "ConvertedLayer": "fx", "SkippedConv": "fx", "Removal": "fx",
         "fold_batchnorms": "deploy", "resconv_layers": "deploy", "onnx_session": "deploy", "OnnxExport": "deploy",
         "read_recipe": "deploy", "distillation_loss": "distill", "DistillationLoss": "distill",
         "StepReport": "pruning", "recalibrate_batchnorm": "pruning"}


def test_the_top_level_holds_what_users_call():
    import resconv_plugin.workflow

    names = set(resconv_plugin.__all__)
    assert TOP_LEVEL <= names and not names & set(MOVED) and len(names) == len(resconv_plugin.__all__) < 30
    assert resconv_plugin.compress is resconv_plugin.workflow.compress


@pytest.mark.parametrize("name, where", sorted(MOVED.items()))
def test_a_name_that_left_the_top_level_warns_with_its_new_place(name, where):
    module = f"resconv_plugin.{where}"
    with pytest.warns(FutureWarning, match=rf"resconv_plugin\.{name} is deprecated .* use {module}\.{name}"):
        value = getattr(resconv_plugin, name)
    assert value is getattr(sys.modules[module], name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        resconv_plugin.no_such_name


def test_compress_is_imported_on_first_use():
    code = ("import sys, resconv_plugin; print('resconv_plugin.workflow' in sys.modules); "
            "resconv_plugin.compress; print('resconv_plugin.workflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
