"""``python -m distkd`` (and ``torchrun -m distkd``) runs the CLI."""

import sys

from distkd.cli import main

sys.exit(main())
