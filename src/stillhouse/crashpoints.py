"""Named kill points for chaos testing: `STILLHOUSE_CRASH_AT=<name>` SIGKILLs the process there.

The windows a random kill rarely hits (between the merge and the rename, inside the clean-up)
are placed deliberately by tests/test_crash_windows.py and bench/chaos.py. Unset, this is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "dataset-merged",  # data.parquet written, manifest not yet
    "before-rename",  # manifest written in the work directory, not yet renamed into place
    "after-rename",  # the artifact is in place, its spent scratch not yet removed
    "mid-tidy",  # the unit markers removed, the shards not yet
    "model-saved",  # a trained model saved in its work directory, manifest not yet
)


def crash_point(name: str) -> None:
    if os.environ.get("STILLHOUSE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
