import sys

from device.meter.cli import main

sys.exit(main(prog="python -m device.meter"))
