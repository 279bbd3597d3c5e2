"""Entrypoints for ``ray job submit``: one per phase and one for the pipeline.

``ray job submit --working-dir . -- python -m jobs.pipeline --num_workers 2 ...``
takes the same config flags as ``kd-dagfm pipeline``.
"""
