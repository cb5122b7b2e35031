"""The staged compression workflow as a public API: what the ``resconv`` command, the benchmarks and the examples
all run.

* :mod:`~resconv_plugin.workflow.config`: :class:`CompressionConfig` (typed; the command's options);
* :mod:`~resconv_plugin.workflow.pipeline`: :func:`compress` / :class:`Pipeline`: baseline -> convert -> sparsity
  -> prune -> channel prune -> fine-tune -> fuse -> save -> report, checkpointed and resumable;
* :mod:`~resconv_plugin.workflow.rules`: the workflow rules (:func:`sparsity_steps`, :func:`remove_pruned`,
  :func:`finetune`);
* :mod:`~resconv_plugin.workflow.training`: one training stage on timm's pieces (:func:`train_stage`,
  :func:`evaluate`);
* :mod:`~resconv_plugin.workflow.distributed`, :mod:`~resconv_plugin.workflow.syncbn`: torchrun and global
  BatchNorm;
* :mod:`~resconv_plugin.workflow.pretrained`: the starting model (timm, local pretrained files);
* :mod:`~resconv_plugin.workflow.report`: per-stage figures, report.json / report.md, plots.

Example:
    >>> from resconv_plugin.workflow import CompressionConfig, compress
    >>> report = compress(CompressionConfig(model="cifar_resnet20", flops_reduction=0.4))  # doctest: +SKIP
"""

from resconv_plugin.workflow.config import DEFAULT_IMPORTANCE, CompressionConfig, ConfigError
from resconv_plugin.workflow.defaults import RECIPES, Recipe, resolve_recipe
from resconv_plugin.workflow.distributed import Dist, init_distributed, resolve_device
from resconv_plugin.workflow.pipeline import STAGES, Pipeline, compress, environment
from resconv_plugin.workflow.rules import Pruned, finetune, remove_pruned, sparsity_steps
from resconv_plugin.workflow.training import (StageProgress, StageSettings, TrainingDiverged, evaluate, model_device,
                                              train_stage)

__all__ = ["CompressionConfig", "ConfigError", "DEFAULT_IMPORTANCE", "RECIPES", "Recipe", "resolve_recipe", "compress", "Pipeline", "STAGES", "environment",
           "sparsity_steps", "remove_pruned", "Pruned", "finetune", "StageSettings", "StageProgress",
           "TrainingDiverged", "train_stage", "evaluate", "model_device", "Dist", "init_distributed", "resolve_device"]
