"""The one checkpoint layer: a checkpoint is complete or ignored, and a run continues from it.

    marker.py        the commit marker: one writer, one reader, one damage policy, for step
                     checkpoints and their universal conversions alike
    layout.py        <run>/checkpoints/step_N: finding committed checkpoints, keep-K pruning,
                     free space; a checkpoint's world size is its marker's
    state.py         the trainer-state file, laid out by component
    checkpointer.py  when to save, and the commit itself (every rank writes, barrier, marker last)
    resume.py        which checkpoint a run continues (plan time) and restoring it (train time)
    universal.py     DeepSpeed's universal conversion: another world size, ZeRO stage or precision
    consolidated.py  a checkpoint's full weights in one process, without an engine
"""
