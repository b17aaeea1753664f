"""`python -m service.cli ...` is the `convtune` command."""

import sys

from service.cli import main

sys.exit(main())
