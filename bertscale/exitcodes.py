"""How a training run ends, and with which exit code: defined here once for every command
(the ground floor: errors, distributed and runlock need them as much as the trainer does).

    0    done (or stopped at --stop-at-step)
    2    bad input: a recipe, flag, file or resume refused before anything ran, or a data
         error every rank stopped on (bertscale.errors.UserError)
    3    the loss or the weights became NaN/inf: nothing saved from that step on, the newest
         committed checkpoint is intact
    75   preempted (SIGTERM / SIGUSR1, or the launcher died) after committing a checkpoint;
         sysexits' EX_TEMPFAIL, "try again later": SLURM scripts requeue on it
    130  Ctrl-C (128 + SIGINT, what a shell reports): after committing a checkpoint at the next
         step boundary, or at once on a second Ctrl-C; nothing requeues it
"""

BAD_INPUT_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130
