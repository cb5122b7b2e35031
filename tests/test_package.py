"""Packaging: lean import, explicit exports, version from metadata, integrations shipped inside the package."""

import importlib.metadata
import subprocess
import sys

import resconv_plugin


def test_import_is_lean():
    code = ("import sys, resconv_plugin; heavy = ['matplotlib', 'fvcore', 'torch_pruning', 'click', 'typer', 'rich', "
            "'pandas']; print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api():
    for name in resconv_plugin.__all__:
        assert hasattr(resconv_plugin, name), name
    assert {"ResConv", "convert", "fuse", "count_flops", "FlopReport", "ConversionReport"} <= set(
        resconv_plugin.__all__)


def test_version_from_metadata():
    assert resconv_plugin.__version__ == importlib.metadata.version("resconv-plugin")


def test_integrations_are_part_of_the_package():
    import resconv_plugin.integrations.fvcore
    import resconv_plugin.integrations.timm

    assert resconv_plugin.integrations.timm.split_norm_act
    assert "aten::add" in resconv_plugin.integrations.fvcore.OP_HANDLES
