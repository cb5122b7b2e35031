"""CIFAR-style networks of the paper, registered in timm's model registry on import of resconv_plugin.

``cifar_resnet20/32/44/56/110``, ``cifar_plain20/56`` (no residual adds) and ``cifar_vgg16_bn/19_bn``; and
:func:`create_resconv_model` (:mod:`~resconv_plugin.models.create`): a timm model converted in one call
(``create_model``, its name before, warns: it read like ``timm.create_model``, which does not convert).
"""

from resconv_plugin.models.cifar import CifarResNet
from resconv_plugin._deprecation import renamed_attributes
from resconv_plugin.models.create import create_resconv_model
from resconv_plugin.models.vgg import CifarVGG

__all__ = ["CifarResNet", "CifarVGG", "create_resconv_model"]

__getattr__ = renamed_attributes(__name__, {"create_model": ("resconv_plugin.models.create", "create_resconv_model")})
