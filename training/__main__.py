import sys

from training.cli import main

if __name__ == "__main__":  # guarded: teacher worker processes are spawned and re-import this
    sys.exit(main())
