"""The installed package's version (from its metadata), readable by any module without importing the package's
``__init__`` (which imports every subpackage)."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("resconv-plugin")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
