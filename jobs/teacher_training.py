"""The teacher_training phase alone on Ray (``kd-dagfm train --phase teacher_training`` on Ray).

Usage: ``ray job submit --working-dir . -- python -m jobs.teacher_training [config flags]``,
or ``python -m jobs.teacher_training [config flags]`` to start a local loopback-only head.
"""

import sys

from jobs._main import main
from kd_dagfm.phases import Phase

if __name__ == "__main__":
    sys.exit(main((Phase.TEACHER_TRAINING,)))
