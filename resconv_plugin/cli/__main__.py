"""``python -m resconv_plugin.cli`` (and ``torchrun ... -m resconv_plugin.cli``) runs the ``resconv`` command."""

import sys

from resconv_plugin.cli import main

sys.exit(main())
