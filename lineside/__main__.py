"""``python -m lineside …`` = the ``lineside`` command."""

import sys

from lineside.cli import main

sys.exit(main())
