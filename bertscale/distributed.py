"""Where this process sits in the job, the process group, and preemption signals.

`discover()` reads the rank layout from whichever launcher started us, in this order:

1. `RANK` / `WORLD_SIZE` already set: torchrun, the `deepspeed` launcher, or our own tests.
2. Open MPI (`OMPI_COMM_WORLD_*`) or an MPICH / Intel MPI PMI (`PMI_RANK`, `PMI_SIZE`): mpirun.
   The master address is rank 0's host, shared through mpi4py, unless `MASTER_ADDR` is set.
   (DeepSpeed's own MPI discovery takes it from `hostname -I`, which picks whatever interface is
   listed first; we set the environment ourselves and turn that discovery off.)
3. SLURM under `srun` (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`, `SLURM_LOCALID`):
   the master is the first host of the step's node list (`scontrol show hostnames`), the port is
   derived from the job id unless `MASTER_PORT` is set, so every task computes the same one.
4. One process started straight on each node of a cluster scheduler, without torchrun (one GPU
   per pod or VM): rank = the node's rank, from `bertscale.nodes.discover_node()`.
5. Nothing: a single process on 127.0.0.1 with a free port.

MPI comes before SLURM because `mpirun` inside an allocation leaves SLURM's variables describing
the batch step, not the MPI ranks.

Preemption: `install_signal_handlers()` makes SIGUSR1 and SIGTERM set a flag and nothing else (no
I/O, no collectives inside a handler); the first Ctrl-C (SIGINT) sets it too (one line on rank
0's terminal), and a second one a moment later stops at once. The trainer folds
`local_preemption_flag()` into the all-reduce of its next read (bertscale.training.agreement), so
all ranks agree at one step boundary even when the signal reached only one of them. A run that
stopped for preemption after committing a checkpoint exits with `PREEMPTED_EXIT_CODE` (75,
EX_TEMPFAIL: "try again later", bertscale.exitcodes), which the SLURM scripts requeue on.

Launcher death: under torchrun or the `deepspeed` launcher, a worker asks Linux to send it
`PARENT_DEATH_SIGNAL` (SIGTERM) when the launcher that spawned it dies (PR_SET_PDEATHSIG). It is
armed when the `bertscale` package is imported, before anything heavy: a launcher killed during
start-up then ends its workers at once (SIGTERM's default action, nothing to save yet) instead of
leaving them in the rendezvous until its timeout; once `install_signal_handlers()` has run, the
same signal takes the preemption path (checkpoint, exit 75) instead of leaving orphans that train
on.

Ending: `shutdown()` ends the groups while the interpreter is whole, and runs at exit too (after an
error). A group outlives destroy_process_group while anything still references it (DeepSpeed's
engine and module globals, torch.distributed.nn's default arguments), and its threads then die in
the interpreter's teardown, in no set order: now and then the process aborts there, after a
finished run ("terminate called without an active exception", exit -6), and the launcher, the
scheduler or the job controller count a failed node.

Limits: one process per accelerator; the local world size from SLURM is only known when
`SLURM_STEP_TASKS_PER_NODE` is uniform (used for logging only). The parent-death signal is Linux
only (elsewhere a killed launcher still orphans its workers); a launcher that dies before the
worker's interpreter has imported `bertscale` (its first few tens of milliseconds) is not
noticed; orphans whose peers are gone too (a whole node lost) cannot checkpoint and stop only
when their collectives time out.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

from bertscale.errors import UserError
from bertscale.files import write_json_atomic
from bertscale.exitcodes import PREEMPTED_EXIT_CODE
from bertscale.nodes import NodeEnv, discover_node, env_int, slurm_hostnames, slurm_node_address

PREEMPTED_RECORD_ENV = "BERTSCALE_PREEMPTED_RECORD"
"""Names a node-local file that every worker which stops for preemption after the commit writes
(`record_preempted_exit`): `bertscale launch` reads it to exit 75 where torchrun exited 1."""

@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """"env" (torchrun / deepspeed launcher), "mpi", "slurm", "single", or the scheduler of a
    process started straight on its node (`NodeEnv.scheduler`)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(env: DistEnv) -> DistEnv:
    if env.world_size < 1:
        raise UserError(f"world size {env.world_size} (from {env.launcher}) must be at least 1")
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"rank {env.rank} (from {env.launcher}) is outside world size {env.world_size}")
    if not 0 < env.master_port < 65536:
        raise UserError(f"master port {env.master_port} is not a TCP port")
    return env


def _from_env(environ: Mapping[str, str]) -> DistEnv:
    world = env_int(environ, "WORLD_SIZE")
    rank = env_int(environ, "RANK")
    local_rank = env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    local_world = env_int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    if world > 1 and ("MASTER_ADDR" not in environ or "MASTER_PORT" not in environ):
        raise UserError(f"RANK/WORLD_SIZE are set (world size {world}) but MASTER_ADDR or "
                        "MASTER_PORT is not; the launcher must set both")
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    port = env_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else _free_port()
    per_node = environ.get("PET_NPROC_PER_NODE", "1")
    if "TORCHELASTIC_RUN_ID" not in environ and "LOCAL_RANK" not in environ and (
            not per_node.isdigit() or int(per_node) > 1):
        # PyTorchJob sets RANK = the pod's index and WORLD_SIZE = pods x processes per pod: one
        # process per pod would wait forever for ranks nobody starts.
        raise UserError(f"PET_NPROC_PER_NODE={per_node}: this pod must run {per_node} processes; "
                        "start them with `bertscale launch` (torchrun), not one `bertscale` alone")
    return DistEnv(rank, world, local_rank, local_world, addr, port, "env")


def _from_mpi(environ: Mapping[str, str]) -> DistEnv:
    if "OMPI_COMM_WORLD_RANK" in environ:
        rank = env_int(environ, "OMPI_COMM_WORLD_RANK")
        world = env_int(environ, "OMPI_COMM_WORLD_SIZE")
        local_rank = env_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_world = env_int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:
        rank, world = env_int(environ, "PMI_RANK"), env_int(environ, "PMI_SIZE")
        local_name = next((n for n in ("MPI_LOCALRANKID", "PMI_LOCAL_RANK") if n in environ), None)
        local_rank = env_int(environ, local_name) if local_name else 0
        size_name = next((n for n in ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE") if n in environ), None)
        local_world = env_int(environ, size_name) if size_name else 1
    addr = environ.get("MASTER_ADDR")
    port = env_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
    if world > 1 and (addr is None or port is None):
        # Rank 0 decides, everyone else hears it: one broadcast over MPI, before any torch
        # process group exists.
        from mpi4py import MPI

        proposal = None
        if rank == 0:
            proposal = (addr or socket.getfqdn(), port or _free_port())
        addr, port = MPI.COMM_WORLD.bcast(proposal, root=0)
    return DistEnv(rank, world, local_rank, local_world, addr or "127.0.0.1", port or _free_port(), "mpi")


def _from_slurm(environ: Mapping[str, str], *, hostnames=slurm_hostnames) -> DistEnv:
    world_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world = env_int(environ, world_name) if world_name in environ else 1
    if "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ and world > 1:
        raise UserError(f"{world_name}={world} but this process was not started by srun "
                        "(no SLURM_STEP_ID); start one task per GPU with `srun`")
    rank = env_int(environ, "SLURM_PROCID")
    local_rank = env_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", ""))
    first = per_node.split(",")[0].split("(")[0]
    local_world = int(first) if first.isdigit() else 1
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UserError("SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor "
                            "SLURM_JOB_NODELIST is; set MASTER_ADDR")
        addr = slurm_node_address(hostnames(nodelist)[0])
    if "MASTER_PORT" in environ:
        port = env_int(environ, "MASTER_PORT")
    else:
        # Every task must agree without talking: derive it from the job id (distinct jobs on a
        # shared node rarely collide; set MASTER_PORT when they do).
        job = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", "0"))
        port = 20000 + (int(job) if job.isdigit() else 0) % 20000
    return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm")


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's rank layout, from whichever launcher started it (see the module doc)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = _from_env(environ)
    elif "OMPI_COMM_WORLD_RANK" in environ or ("PMI_RANK" in environ and "PMI_SIZE" in environ):
        env = _from_mpi(environ)
    elif "SLURM_PROCID" in environ:
        env = _from_slurm(environ)
    elif (node := discover_node(environ)).scheduler != "none":
        env = _one_process_per_node(node)
    else:
        env = DistEnv(0, 1, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"),
                      env_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else _free_port(),
                      "single")
    return _check(env)


def _one_process_per_node(node: NodeEnv) -> DistEnv:
    """The rank layout of a process started straight on each node (no torchrun): one process
    per node, ranked by the node's rank."""
    if node.elastic or node.node_rank is None:
        raise UserError(f"an elastic node range ({node.nnodes}) needs torchrun's rendezvous: "
                        f"start this job with `bertscale launch`")
    if node.nproc_per_node != "1":
        raise UserError(f"{node.nproc_per_node} processes per node ({node.source}): start them "
                        f"with `bertscale launch` (torchrun), not one `bertscale` per node")
    world = node.node_range[0]
    return DistEnv(node.node_rank, world, 0, 1, node.master_addr, node.master_port, node.scheduler)


def clear_preempted_record() -> None:
    """At the start of a worker group: a record left by an earlier group (torchrun restarted
    the workers, or an earlier run of the launcher) says nothing about this one. Every rank calls
    it before its first step, so it precedes any rank's record of this group."""
    path = os.environ.get(PREEMPTED_RECORD_ENV)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def record_preempted_exit(step: int) -> None:
    """This worker stops for preemption with checkpoint `step` committed: tell the launcher on
    this node (PREEMPTED_RECORD_ENV), if one asked."""
    path = os.environ.get(PREEMPTED_RECORD_ENV)
    if path:
        write_json_atomic(Path(path), {"step": step, "rank": os.environ.get("RANK"),
                                       "exit_code": PREEMPTED_EXIT_CODE})


def export_env(env: DistEnv) -> None:
    """Write the layout into os.environ the way torchrun would, for torch / DeepSpeed to read."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(env.local_world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))


def init(env: DistEnv, timeout_s: float = 1800) -> None:
    """Start the process group through DeepSpeed (gloo on CPU, nccl on GPU), on the layout we
    discovered ourselves. Idempotent."""
    export_env(env)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.is_available() and dist.is_initialized():
        return
    _before_the_first_group()
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(device_index(env.local_rank, accel.device_count()))
    # The op init_distributed loads (built once per environment), free of stale build locks.
    from bertscale import jitbuild
    jitbuild.load_ops(lambda msg: print(msg, file=sys.stderr, flush=True))
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))


# ------------------------------------------------------------------------------ devices

# What the launcher or scheduler says about GPUs given to this process. Empty, "-1" or SLURM's
# "NoDevFiles" mean none; SLURM_GPUS_ON_NODE is a count (0: none), the others list devices.
GPU_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")
_NO_GPUS = ("", "-1", "none", "nodevfiles", "void")


def allocated_gpus(environ: Mapping[str, str] | None = None) -> str | None:
    """`NAME=value` of the first variable that gives this process GPUs, or None."""
    environ = os.environ if environ is None else environ
    for name in GPU_ENV_VARS:
        value = environ.get(name, "").strip()
        if value.lower() in _NO_GPUS or (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue
        return f"{name}={value}"
    return None


def require_usable_gpus(environ: Mapping[str, str] | None = None) -> None:
    """Refuse to start when GPUs are allocated but torch cannot use them (a CPU-only torch on a
    GPU node would otherwise train on the CPU without complaint, bf16 included). An explicit
    DS_ACCELERATOR=cpu is the way to train on the CPU anyway."""
    environ = os.environ if environ is None else environ
    given = allocated_gpus(environ)
    if given is None or environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return
    import torch

    if torch.cuda.is_available():
        return
    why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
           f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them (no driver, or "
           f"no device visible)")
    raise UserError(f"{given}: GPUs are allocated to this job, but {why}; install a CUDA build of "
                    f"torch, or set DS_ACCELERATOR=cpu to run on the CPU on purpose")


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU a rank binds to: its local rank modulo the devices it sees (a scheduler that gives
    each task its own CUDA_VISIBLE_DEVICES leaves every task one device, index 0)."""
    return local_rank % device_count if device_count > 0 else 0


def local_device_index(env: DistEnv) -> int:
    """`device_index` for this rank on DeepSpeed's accelerator (what the engine is given)."""
    from deepspeed.accelerator import get_accelerator

    return device_index(env.local_rank, get_accelerator().device_count())


def init_torch(env: DistEnv, backend: str, timeout_s: float = 1800) -> None:
    """Start a plain torch.distributed group on the layout we discovered (no DeepSpeed: for
    fine-tuning and `embed`). Idempotent."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    _before_the_first_group()
    dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_problems(problems: list[str]) -> list[str]:
    """Every rank's problems, in rank order, on every rank (so that all ranks can stop with the
    same message instead of the healthy ones waiting in the next collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(problems)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(problems))
    return [f"{msg} (found by rank {r})" for r, found in enumerate(gathered) for msg in found or ()]


def shutdown() -> None:
    """End this process's groups now, while the interpreter is whole (module docstring,
    "Ending"): through DeepSpeed when it started them, so that its references to them go too,
    then a collection for what the run left in reference cycles. Idempotent."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    gc.collect()


def _before_the_first_group() -> None:
    """torch.distributed.nn takes the default group as a default argument when it is imported;
    DeepSpeed imports it once the group exists, which would keep the group for the life of the
    process. Imported first, its defaults stay None. And `shutdown` runs at exit in any case."""
    import torch.distributed.nn  # noqa: F401

    atexit.unregister(_release_at_exit)
    atexit.register(_release_at_exit)


def _release_at_exit() -> None:
    # After an uncaught exception, sys.last_traceback holds the frames that hold the engine.
    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            delattr(sys, name)
    shutdown()


# ------------------------------------------------------------------------------ preemption

_preempt = threading.Event()
_signal_seen: list[str] = []


# A second SIGINT sooner than this after the first is the same key press delivered again: a
# terminal sends Ctrl-C to every process of its foreground group, and torchrun or `bertscale
# demo` forward the one they got to their workers too.
SAME_INTERRUPT_S = 1.0
_first_interrupt: list[float] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Only set a flag: the loop acts on it at the next step boundary, on every rank together.
    if signum == signal.SIGINT:
        _on_interrupt()
        return
    _signal_seen.append(signal.Signals(signum).name)
    _preempt.set()


def _on_interrupt() -> None:
    """Ctrl-C: the first asks for a checkpoint at the next step boundary (like a preemption,
    with exit 130 and no requeue); another one, a moment later, stops at once (KeyboardInterrupt,
    nothing saved), as Python does by default."""
    now = time.monotonic()
    if not _first_interrupt:
        _first_interrupt.append(now)
        _signal_seen.append("SIGINT")
        _preempt.set()
        if os.environ.get("RANK", "0") == "0":  # one line on the terminal, not one per rank
            with contextlib.suppress(OSError):   # a closed stderr must not raise mid-step
                os.write(2, b"\nbertscale: Ctrl-C: stopping after this step with a checkpoint "
                            b"(Ctrl-C again to stop at once, without one)\n")
        return
    if now - _first_interrupt[0] < SAME_INTERRUPT_S:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt


def install_signal_handlers(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM,
                                                        signal.SIGINT)) -> None:
    """Make SIGUSR1 / SIGTERM request a checkpoint-and-exit instead of killing the process, and
    the first Ctrl-C (SIGINT) a checkpoint-and-stop; under torchrun / the deepspeed launcher,
    also when the launcher dies (`die_with_launcher`)."""
    for s in signals:
        signal.signal(s, _on_signal)
    # After the handlers: a launcher that is already gone must find them in place.
    die_with_launcher()


# Read when bertscale is imported (its __init__ imports this module first), as early as we can:
# die_with_launcher compares it with the parent after the prctl, to notice a launcher that died
# before the kernel was told to watch it.
_PARENT_AT_START = os.getppid()

PARENT_DEATH_SIGNAL = signal.SIGTERM
"""What a worker gets when its launcher dies. SIGTERM, because it takes the preemption path above
(the ranks agree at the next step boundary, commit a checkpoint and exit 75) when the handlers are
installed, and kills at once before that (nothing to save yet); and because it is also what
torchrun forwards and what SLURM sends at preemption, so every stop looks the same to the loop.
SIGUSR1 would do the same after the handlers, but reads as "a SLURM time limit" in the log."""


def spawning_launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """"torchrun" or "deepspeed" when this process is a worker that launcher spawned itself (its
    direct child), else None (srun, mpirun and a single process have their own cleanup)."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ and "LOCAL_SIZE" in environ:  # deepspeed.launcher.launch sets both
        return "deepspeed"
    return None


def die_with_launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """Have Linux send PARENT_DEATH_SIGNAL to this worker when its torchrun / deepspeed launcher
    dies (`kill -9` of torchrun otherwise leaves its workers training and committing). Returns
    the launcher's name when armed, else None. Both launchers start workers from their main
    thread, which lives as long as the launcher (the kernel watches the spawning thread)."""
    launcher = spawning_launcher(environ)
    if launcher is None or not sys.platform.startswith("linux"):
        return None
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(PARENT_DEATH_SIGNAL), 0, 0, 0) != 0:
        return None
    # The launcher died before the prctl (we were re-parented to init or a subreaper): the kernel
    # will never send the signal, so send it ourselves. (Not `getppid() == 1`: in a container the
    # launcher itself may be pid 1.)
    if os.getppid() != _PARENT_AT_START:
        os.kill(os.getpid(), PARENT_DEATH_SIGNAL)
    return launcher


def local_preemption_flag() -> bool:
    """Whether THIS process received a preemption signal (no communication)."""
    return _preempt.is_set()


def signal_names() -> list[str]:
    """Names of the signals received so far, for the log line."""
    return list(_signal_seen)
