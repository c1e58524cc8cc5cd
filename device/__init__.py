"""Device runtime: runs verified model bundles with LiteRT on a Raspberry Pi, a Coral board or a host.

Imports neither TensorFlow nor the `training`/`converter` packages; `pip install .[device]` is enough.
"""

__version__ = "0.1.0"
