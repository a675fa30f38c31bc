"""`python -m penwright` (and `torchrun -m penwright train ...`)."""

import sys

from .cli import main

sys.exit(main())
