"""From a trained, pruned model to what ships: fusion, BatchNorm folding, ONNX export, save / load.

* :mod:`~resconv_plugin.deploy.fuse`: :func:`fuse` (a copy unless ``inplace=True``): every gate into a plain conv;
* :mod:`~resconv_plugin.deploy.fold`: :func:`fold_batchnorms` (in place) and :func:`deployed` (a fused, folded copy);
* :mod:`~resconv_plugin.deploy.onnx_export`: :func:`export_onnx`, checked in ONNX Runtime;
* :mod:`~resconv_plugin.deploy.checkpoint`: :func:`save` / :func:`load` (safetensors + a JSON recipe);
* :mod:`~resconv_plugin.deploy.structure`: the module tree described as plain data, and rebuilt from it;
* :mod:`~resconv_plugin.deploy.channel_replay`: replaying torch-pruning histories of version-1 checkpoints.
"""

from resconv_plugin.deploy.checkpoint import load, read_recipe, save
from resconv_plugin.deploy.fold import deployed, fold_batchnorms
from resconv_plugin.deploy.fuse import fuse, resconv_layers
from resconv_plugin.deploy.onnx_export import OnnxExport, export_onnx, onnx_session

__all__ = ["fuse", "resconv_layers", "fold_batchnorms", "deployed", "export_onnx", "onnx_session", "OnnxExport",
           "save", "load", "read_recipe"]
