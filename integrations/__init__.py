"""Host-library glue: what resconv_plugin needs to know about timm, torch-pruning and fvcore.

Installed as ``resconv_plugin.integrations``. The modules import their host library when they are imported, so the
core package imports them lazily where a host is optional at import time (fvcore).
"""

__all__: list = []
