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


PLAIN_CHECKOUT = """
import sys
# what a plain source checkout sees: no installed package finder, the repository on the path
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, sys.argv[1])
import resconv_plugin
from resconv_plugin.integrations.torch_pruning import channel_pruner
import resconv_plugin.integrations.timm
print(resconv_plugin.__file__, resconv_plugin.integrations.timm.__file__)
"""


def test_imports_work_from_a_plain_source_checkout():
    from pathlib import Path

    root = Path(resconv_plugin.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PLAIN_CHECKOUT, str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    package, glue = out.stdout.split()
    assert package == str(root / "resconv_plugin" / "__init__.py") and glue == str(root / "integrations" / "timm.py")


def test_core_never_imports_the_integrations():
    code = ("import sys, torch, resconv_plugin; m = resconv_plugin.create_resconv_model('cifar_resnet20', in_chans=1); "
            "f = resconv_plugin.deployed(m); resconv_plugin.count_flops(f, torch.zeros(1, 1, 32, 32)); "
            "resconv_plugin.save(f, sys.argv[1]); resconv_plugin.load(sys.argv[1]); "
            "resconv_plugin.LayerPruner(m, torch.zeros(1, 1, 32, 32), flops_reduction=0.2).select(); "
            "print([n for n in sys.modules if n.startswith('resconv_plugin.integrations.')])")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-c", code, f"{folder}/m.safetensors"], capture_output=True,
                             text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
