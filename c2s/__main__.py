"""python -m c2s: the `c2s` command (also `accelerate launch -m c2s train ...`)."""

import sys

from c2s.cli import main

sys.exit(main())
