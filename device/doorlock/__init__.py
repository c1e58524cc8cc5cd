"""Face-recognition door lock for a Raspberry Pi: camera → face → embedding → decision → relay.

Modules: `config` (TOML settings), `pipeline` (one frame through detect/crop/embed/match), `enroll`
(SQLite gallery of people), `decide` (threshold, voting, rate limits, liveness), `relay` (gpiozero
output, fail-secure), `audit` (decision log and snapshots), `service` (`doorlock run`), `evaluate`
(FAR/FRR per attempt on labelled crops), `bench` (frames/s per stage), `cli` (the `doorlock` command).
"""

import os

# numpy's OpenBLAS on one thread, set before numpy loads (the `doorlock` command and `python -m device.doorlock`
# import this package first). The per-frame cohort match (device.face.Cohort) is big enough for OpenBLAS to
# start its worker threads, which then spin against OpenCV's and the interpreter's threads: measured on the
# 2-core host, full-search door-lock frames went from 113 to 69 FPS (detection 7.1 → 11.3 ms). Export another
# value to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
