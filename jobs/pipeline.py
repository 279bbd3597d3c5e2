"""All three phases in order, then the results table (``kd-dagfm pipeline`` on Ray).

Usage: ``ray job submit --working-dir . -- python -m jobs.pipeline [config flags]``,
or ``python -m jobs.pipeline [config flags]`` to start a local loopback-only head.
"""

import sys

from jobs._main import main
from kd_dagfm.phases import PIPELINE

if __name__ == "__main__":
    sys.exit(main(PIPELINE))
