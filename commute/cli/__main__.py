"""``python -m commute.cli`` (and ``torchrun -m commute.cli``): the ``commute`` command."""

import sys

from commute.cli import main

sys.exit(main())
