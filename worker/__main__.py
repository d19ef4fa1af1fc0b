"""`python -m worker` = `fashion-worker`."""

import sys

from worker.cli import main

sys.exit(main())
