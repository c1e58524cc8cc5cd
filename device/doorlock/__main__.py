"""`python -m device.doorlock` is the same as the `doorlock` command."""

import sys

from device.doorlock.cli import main

sys.exit(main())
