"""Who does what in a prepare job: one process, or the ranks of an MPI job (`mpirun`, `srun`),
and a barrier that carries any rank's error to all of them (no rank hangs waiting)."""

from __future__ import annotations

import os
import re
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from bertscale.data.prepare.config import START_TIMEOUT_S
from bertscale.errors import UserError

R = TypeVar("R")


class Context:
    """Rank / size and a barrier that carries errors (size 1 when not under MPI)."""

    rank = 0
    size = 1
    is_mpi = False

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def wait_for_all_ranks(self, folder: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        """One process: nobody to wait for."""


class MPIContext(Context):
    is_mpi = True

    def __init__(self) -> None:
        from mpi4py import MPI  # only under an MPI launcher: importing it initialises MPI

        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def wait_for_all_ranks(self, folder: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        """Return once every rank is past MPI_Init, learnt without an MPI message.

        Open MPI 4.1 (seen with Debian 12's 4.1.4) can crash a rank that is still inside MPI_Init
        when a message from a rank that left it earlier arrives: the PML has not registered its
        receive handler yet, and the TCP BTL calls a null function (SIGSEGV in
        mca_btl_tcp.so, about one two-node `srun --mpi=pmix` start in 100 on a test machine;
        Open MPI PR 13559 describes the same race on its main branch). So the first message
        waits for a file from each rank in `folder`, which every rank must share anyway (the
        shards of all ranks go there). A rank that never shows up is named with the folder: the
        usual cause is an --out that is not on a filesystem all nodes share."""
        key = _launch_key()
        if key is None:
            return  # a launcher that names no job: no folder of its own to meet in
        meet = folder / f".mpi-start-{key}"
        meet.mkdir(parents=True, exist_ok=True)
        (meet / f"rank{self.rank}").touch()
        want = {f"rank{r}" for r in range(self.size)}
        deadline, pause = time.monotonic() + timeout_s, 0.02
        while missing := want - set(os.listdir(meet)):
            if time.monotonic() > deadline:
                ranks = sorted(int(m[4:]) for m in missing)
                shown = ", ".join(map(str, ranks[:8])) + (" …" if len(ranks) > 8 else "")
                raise UserError(f"rank(s) {shown} of {self.size} did not appear in "
                                f"{meet.absolute()} within {timeout_s:.0f} s; is "
                                f"{folder.absolute()} on a filesystem every node shares, and did "
                                f"every rank start?")
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        self.comm.Barrier()  # safe now; after it nobody reads `meet` any more
        if self.rank == 0:
            shutil.rmtree(meet, ignore_errors=True)  # a leftover marker folder is harmless


def _launch_key() -> str | None:
    """A name all ranks of this MPI job see alike and no other job shares, from the launcher's
    environment (PMIx: srun --mpi=pmix, Open MPI's mpirun; else SLURM's job and step)."""
    key = os.environ.get("PMIX_NAMESPACE") or os.environ.get("OMPI_MCA_ess_base_jobid")
    if not key and os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
        key = f"slurm.{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) if key else None


# Set by mpirun/mpiexec (Open MPI, MPICH/Hydra, MVAPICH, Intel MPI) or by srun's PMI plugins.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMI_FD", "PMIX_RANK",
            "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def detect_context() -> Context:
    """MPI when an MPI launcher (or srun with a PMI plugin) started us, else one process."""
    # srun sets SLURM_STEP_NUM_TASKS for the tasks of a step (not for the batch script).
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if any(v in os.environ for v in _MPI_ENV):
        ctx = MPIContext()
        if ctx.size == 1 and step_tasks > 1:
            raise UserError(f"launched by srun with {step_tasks} tasks but MPI sees 1 rank: "
                            f"run `srun --mpi=pmix` (or pmi2) so the ranks can talk")
        return ctx
    if step_tasks > 1:
        raise UserError(f"launched by srun with {step_tasks} tasks but without MPI: every task "
                        f"would do all the work; run `srun --mpi=pmix bertscale prepare …`")
    return Context()


def collective(ctx: Context, what: str, fn: Callable[[], R]) -> R:
    """Run `fn` on every rank; if any rank fails, every rank raises (no rank hangs waiting)."""
    if ctx.size == 1:
        return fn()
    err: str | None = None
    result: R | None = None
    try:
        result = fn()
    except UserError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - a bug: keep its traceback on this rank, stop the others too
        traceback.print_exc()
        err = f"{type(e).__name__}: {e}"
    errors = ctx.allgather(err)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        raise UserError(f"{what} failed: " + "; ".join(f"rank {r}: {e}" for r, e in bad))
    return cast(R, result)
