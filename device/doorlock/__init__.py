"""Face-recognition door lock for a Raspberry Pi: camera → face → embedding → decision → relay.

Modules: `config` (TOML settings), `pipeline` (one frame through detect/crop/embed/match), `enroll`
(SQLite gallery of people), `decide` (threshold, voting, rate limits, liveness), `relay` (gpiozero
output, fail-secure), `audit` (decision log and snapshots), `service` (`doorlock run`), `evaluate`
(FAR/FRR per attempt on labelled crops), `bench` (frames/s per stage), `cli` (the `doorlock` command).
"""
