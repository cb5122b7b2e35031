"""CIFAR-style networks of the paper, registered in timm's model registry on import of resconv_plugin."""

from resconv_plugin.models.cifar import CifarResNet

__all__ = ["CifarResNet"]
