"""CIFAR-style networks of the paper, registered in timm's model registry on import of resconv_plugin.

``cifar_resnet20/32/44/56/110``, ``cifar_plain20/56`` (no residual adds) and ``cifar_vgg16_bn/19_bn``; and
:func:`create_model` (:mod:`~resconv_plugin.models.create`): a timm model converted in one call.
"""

from resconv_plugin.models.cifar import CifarResNet
from resconv_plugin.models.create import create_model
from resconv_plugin.models.vgg import CifarVGG

__all__ = ["CifarResNet", "CifarVGG", "create_model"]
