"""``python -m famtune`` (and ``torchrun -m famtune``) run the famtune command."""

import sys

from famtune.cli import main

sys.exit(main())
