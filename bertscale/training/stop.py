"""StopTraining: a component's verdict that the run ends now; the exit codes it carries are
bertscale.exitcodes' (0 done, 2 bad input, 3 non-finite, 75 preempted, 130 Ctrl-C)."""

from __future__ import annotations


class StopTraining(Exception):
    """A component's verdict that the run ends now with `exit_code`, after it has said why (on
    rank 0's terminal). Every rank reaches it at the same point: it is decided from all-reduced
    values only."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code
