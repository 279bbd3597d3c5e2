"""The finetuning phase alone on Ray (``kd-dagfm train --phase finetuning`` on Ray).

Usage: ``ray job submit --working-dir . -- python -m jobs.finetuning [config flags]``,
or ``python -m jobs.finetuning [config flags]`` to start a local loopback-only head.
"""

import sys

from jobs._main import main
from kd_dagfm.phases import Phase

if __name__ == "__main__":
    sys.exit(main((Phase.FINETUNING,)))
