"""``python -m ipcfork``: the same as the ``ipcfork`` command."""

import sys

from .cli import main

sys.exit(main())
