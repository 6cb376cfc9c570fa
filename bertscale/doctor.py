"""The checks of `bertscale doctor`: the environment of a job, before it spends its allocation.

Launched exactly like the training job (one process per device, by srun, torchrun, the deepspeed
launcher or mpirun), it checks, with a clear one-line message per failure and a non-zero exit:

  ranks       every rank joins one process group within --timeout (rank layout from the launcher,
              as the trainer discovers it), on which hosts
  launch      how the ranks were started (torchrun and its rendezvous id and restart count, srun,
              mpirun, ...) and what the cluster scheduler says of the nodes (Kubeflow's PET_*, an
              Indexed Job or JobSet pod, SkyPilot, SLURM: bertscale.nodes.discover_node);
              FAIL when nodes disagree on the job (node count, rendezvous host) or two nodes
              claim one node rank
  all-reduce  a 4 MiB all-reduce completes within --timeout with the right sum (on the GPUs
              with NCCL when there are GPUs, else gloo), and how long it took
  gpus        each rank sees a GPU (local rank modulo the GPUs it sees), all of the same model,
              no two ranks on one GPU; on a CPU-only job "none", which is fine unless
              --require-gpu. GPUs allocated (CUDA_VISIBLE_DEVICES, SLURM_*_GPUS) to a torch that
              cannot use them (a CPU-only build) is one line and exit 2 (unless --cpu).
  checkpoint  the checkpoint folder is writable by every rank (temp file, fsync, rename, delete)
              and is ONE folder shared by all of them (rank 0 commits what the others write, and
              elastic conversion runs on rank 0), with the free space
  shards      every shard in the manifest is there with the size and sha256 the manifest says
              (the ranks split the shards between them); for shards in an object store, rank 0
              reads the first and last shard's size and first block with the job's credentials
  wandb       offline/disabled, or online with an API key and api.wandb.ai reachable; otherwise a
              warning (the trainer then logs offline; it never fails a job over wandb)
  jit-build   where DeepSpeed's JIT-built op is cached (TORCH_EXTENSIONS_DIR, else one folder per
              Python environment), and a warning for each stale build lock there or in torch's
              shared default (a process killed while building left it; every DeepSpeed start
              waits on it forever): `bertscale pretrain` removes one itself, other programs
              do not

On success rank 0 prints a summary table. Every rank exits with the same code (0 ok, 1 failed).

Limits: a rank that never starts (or a wrong MASTER_ADDR) is reported by the watchdog as a timeout,
without naming the missing rank (nobody can know which one it would have been). The GPU check
compares models, not driver versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from bertscale.errors import UserError
from bertscale.files import write_text_atomic

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass
class DoctorConfig:
    """What `run_checks` checks, and how long a rank waits for the others at each step."""

    checkpoint_dir: Path | None = None
    """The run's checkpoint folder (writable by every rank, one shared folder); None: skipped."""
    manifest: str | None = None
    """A data manifest (or its folder, or its URL): every shard checked; None: skipped."""
    sha256: bool = True
    """Check each shard's sha256, not only its size."""
    require_gpu: bool = False
    cpu: bool = False
    """gloo on the CPU even when GPUs are there."""
    wandb: bool = True
    """The job logs to Weights & Biases (else the wandb check is skipped)."""
    timeout_s: float = 120.0
    """Seconds for joining and for each collective."""

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise UserError(f"--timeout must be positive, got {self.timeout_s}")


@dataclass
class Finding:
    check: str
    status: str
    detail: str
    rank: int = 0
    host: str = ""


# ------------------------------------------------------------------------------ the checks


def _node_name() -> str:
    # SLURM's node name when there is one (virtual nodes can share one host name).
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def check_ranks(dist, world: int) -> Finding:
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, _node_name())
    per_host: dict[str, int] = {}
    for h in hosts:
        per_host[h] = per_host.get(h, 0) + 1
    where = ", ".join(f"{h} ({n})" for h, n in per_host.items())
    return Finding("ranks", OK, f"{world} rank(s) on {len(per_host)} node(s): {where}")


def _how_started(env, environ) -> str:
    if "TORCHELASTIC_RUN_ID" in environ:
        return (f"torchrun (rendezvous id {environ['TORCHELASTIC_RUN_ID']}, worker restart "
                f"{environ.get('TORCHELASTIC_RESTART_COUNT', '0')} of "
                f"{environ.get('TORCHELASTIC_MAX_RESTARTS', '0')})")
    return {"env": "a launcher's RANK/WORLD_SIZE", "mpi": "mpirun", "slurm": "srun",
            "single": "one process"}.get(env.launcher, f"one process per node ({env.launcher})")


def check_launch(dist, env, rank: int, world: int) -> list[Finding]:
    """How the ranks were started and what the scheduler says of the nodes; the nodes must agree
    on the job and hold distinct node ranks."""
    from bertscale import nodes
    try:
        node = nodes.discover_node()
        job = (node.scheduler, node.nnodes, f"{node.master_addr}:{node.master_port}", node.rdzv_id)
        mine: tuple[str | None, tuple[str, str, str, str] | None, int | None, str | None] = (
            None, job, node.node_rank, node.source)
    except UserError as e:
        mine = (str(e), None, None, None)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (*mine, _how_started(env, os.environ), _node_name()))
    if rank != 0:
        return []
    out = [Finding("launch", FAIL, problem, r, host)
           for r, (problem, _, _, _, _, host) in enumerate(everyone) if problem]
    if out:
        return out[:1]
    jobs = {job for _, job, _, _, _, _ in everyone}
    if len(jobs) > 1 and any(job[0] != "none" for job in jobs):
        return [Finding("launch", FAIL, "the nodes disagree on the job (scheduler, node count, "
                        "rendezvous host, id): " + "; ".join(map(str, sorted(jobs))))]
    claimed: dict[int, set[str]] = {}
    for _, _, node_rank, _, _, host in everyone:
        if node_rank is not None:
            claimed.setdefault(node_rank, set()).add(host)
    twice = {r: hosts for r, hosts in claimed.items() if len(hosts) > 1}
    if twice:
        r, hosts = min(twice.items())
        return [Finding("launch", FAIL, f"node rank {r} is claimed by {len(hosts)} nodes "
                        f"({', '.join(sorted(hosts))}): the scheduler's rank variables are wrong")]
    _, (scheduler, nnodes, where, rdzv_id), _, source, how, _ = everyone[0]
    detail = f"started by {how}"
    if scheduler != "none":
        detail += f"; {source}: {nnodes} node(s), rendezvous {where} (id {rdzv_id})"
    return [Finding("launch", OK, detail)]


def check_allreduce(dist, device, rank: int, world: int) -> Finding:
    import torch
    x = torch.full((1 << 20,), float(rank + 1), device=device)        # 4 MiB of fp32
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    expect = world * (world + 1) / 2
    if not torch.all(x == expect):
        return Finding("all-reduce", FAIL, f"wrong sum: expected {expect}, got values in "
                       f"[{x.min().item()}, {x.max().item()}]", rank)
    backend = dist.get_backend()
    return Finding("all-reduce", OK, f"4 MiB {backend} all-reduce correct in {ms:.1f} ms", rank)


def shared_gpus(devices: list[tuple[str, str | None]]) -> list[Finding]:
    """One FAIL per GPU that several ranks bound to, from each rank's (node, GPU uuid or None).
    NCCL refuses such a group ("Duplicate GPU detected"), and so would the memory."""
    ranks_of: dict[tuple[str, str], list[int]] = {}
    for r, (host, uuid) in enumerate(devices):
        if uuid is not None:
            ranks_of.setdefault((host, uuid), []).append(r)
    return [Finding("gpus", FAIL, f"ranks {', '.join(map(str, ranks))} share one GPU ({uuid}) on "
                    f"{host}; give each rank its own GPU (the launcher's LOCAL_RANK, srun "
                    f"--gpus-per-task=1 or --ntasks-per-node = GPUs per node)", ranks[0], host)
            for (host, uuid), ranks in ranks_of.items() if len(ranks) > 1]


def check_gpus(dist, local_rank: int, require_gpu: bool, rank: int, world: int) -> list[Finding]:
    import torch

    from bertscale.distributed import device_index
    mine, uuid = None, None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible:
        index = device_index(local_rank, visible)
        p = torch.cuda.get_device_properties(index)
        mine = (p.name, round(p.total_memory / 2**30, 1))
        uuid = str(getattr(p, "uuid", "") or f"index {index}")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (mine, visible, _node_name(), uuid))
    if rank != 0:
        return []
    missing = [(r, host, n) for r, (gpu, n, host, _) in enumerate(everyone) if gpu is None]
    if len(missing) == world:
        status = FAIL if require_gpu else OK
        return [Finding("gpus", status, "none visible (CPU run)" +
                        ("; --require-gpu was given" if require_gpu else ""))]
    out = []
    for r, host, n in missing:
        out.append(Finding("gpus", FAIL, f"no GPU for local rank of rank {r} ({n} visible on "
                           f"that node; check CUDA_VISIBLE_DEVICES and --gpus-per-node)", r, host))
    out += shared_gpus([(host, uuid) for _, _, host, uuid in everyone])
    models = {gpu for gpu, _, _, _ in everyone if gpu is not None}
    if len(models) > 1:
        out.append(Finding("gpus", FAIL, "ranks see different GPUs: " +
                           ", ".join(f"{m[0]} {m[1]} GiB" for m in sorted(models))))
    if not out:
        (name, mem), = models
        out.append(Finding("gpus", OK, f"{world} x {name} ({mem} GiB)"))
    return out


def check_checkpoint_dir(dist, folder: Path | None, rank: int, world: int) -> list[Finding]:
    if folder is None:
        return [Finding("checkpoint", SKIP, "no --run-dir / --checkpoint-dir given")] if rank == 0 else []
    # Rank 0 decides a token and writes it; every rank writes its own probe, then reads rank 0's.
    tokens = [hashlib.sha256(f"{time.time_ns()}-{os.getpid()}".encode()).hexdigest()[:16]]
    dist.broadcast_object_list(tokens, src=0)
    token = tokens[0]
    shared_probe = folder / f".doctor-{token}"
    problem = ""
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(shared_probe, token)
        except OSError as e:
            problem = f"{folder} is not writable ({type(e).__name__}: {e.strerror or e})"
    dist.barrier()
    if not problem:
        own = folder / f".doctor-{token}-rank{rank}"
        try:
            write_text_atomic(own, token)
            own.unlink()
        except OSError as e:
            problem = f"{folder} is not writable ({type(e).__name__}: {e.strerror or e})"
        if not problem and rank != 0:
            try:
                if shared_probe.read_text() != token:
                    raise FileNotFoundError
            except OSError:
                problem = (f"{folder} is not shared: rank 0's file is not visible here; the "
                           f"checkpoint folder must be one filesystem mounted on every node")
    problems: list = [None] * world
    dist.all_gather_object(problems, (problem, _node_name()))
    dist.barrier()
    if rank != 0:
        return []
    with contextlib.suppress(OSError):   # there is none when the folder was not writable
        shared_probe.unlink()
    bad = [Finding("checkpoint", FAIL, p, r, h) for r, (p, h) in enumerate(problems) if p]
    if bad:
        # One line per distinct problem: 64 nodes with the same read-only mount say it once.
        seen: dict[str, Finding] = {}
        for f in bad:
            seen.setdefault(f.detail, f)
        return list(seen.values())
    free = shutil.disk_usage(folder).free / 2**30
    return [Finding("checkpoint", OK, f"{folder} writable and shared by all ranks, "
                    f"{free:.1f} GiB free")]


# Over ruff's complexity limit on purpose: one check per way a shard can be wrong, each with its
# message.
def check_shards(dist, manifest_path: str | None, verify_sha256: bool, rank: int,  # noqa: C901
                 world: int) -> list[Finding]:
    if manifest_path is None:
        return [Finding("shards", SKIP, "no --manifest given")] if rank == 0 else []
    problems: list[str] = []
    checked = remote = nbytes = 0
    n_shards = 0
    try:
        from bertscale.data.shards import read_manifest, sha256_file
        manifest = read_manifest(manifest_path if "://" in str(manifest_path)
                                 else Path(manifest_path).resolve())
    except UserError as e:
        manifest = None
        problems.append(str(e))
    if manifest is not None:
        work = [(split, i, info) for split, infos in manifest.shards.items()
                for i, info in enumerate(infos)]
        n_shards = len(work)
        for split, i, info in work[rank::world]:
            where = manifest.shard_location(split, i)
            if "://" in where or where.startswith("pipe:"):
                remote += 1
                continue
            path = Path(where)
            try:
                size = path.stat().st_size
                if size != info.bytes:
                    problems.append(f"{path}: {size} bytes, the manifest says {info.bytes} "
                                    f"(truncated or replaced)")
                    continue
                if verify_sha256 and sha256_file(path) != info.sha256:
                    problems.append(f"{path}: sha256 differs from the manifest (corrupted or "
                                    f"replaced)")
                    continue
            except OSError as e:
                problems.append(f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})")
                continue
            checked += 1
            nbytes += info.bytes
    if manifest is not None and remote and rank == 0:
        problems += _probe_remote(manifest)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (problems, checked, remote, nbytes, _node_name()))
    if rank != 0:
        return []
    out = []
    seen: set[str] = set()
    for r, (probs, _, _, _, host) in enumerate(everyone):
        for p in probs:
            if p not in seen:
                seen.add(p)
                out.append(Finding("shards", FAIL, p, r, host))
    if out:
        return out
    checked = sum(e[1] for e in everyone)
    remote = sum(e[2] for e in everyone)
    nbytes = sum(e[3] for e in everyone)
    how = "sha256 verified" if verify_sha256 else "sizes checked (sha256 skipped)"
    detail = f"{checked}/{n_shards} shards, {nbytes / 2**20:.1f} MiB, {how}"
    if remote:
        detail += f"; {remote} remote shard(s): the first and last are readable"
    return [Finding("shards", OK, detail)]


def _probe_remote(manifest) -> list[str]:
    """Read access to the first and last remote shard: size as the manifest says, and the first
    tar header (one ranged GET each), with the credentials this job's environment gives."""
    from bertscale.data import remote

    work = [(split, i) for split, infos in manifest.shards.items() for i in range(len(infos))
            if remote.is_remote(manifest.shard_location(split, i))]
    problems = []
    for split, i in dict.fromkeys([work[0], work[-1]]):
        url, info = manifest.shard_location(split, i), manifest.shards[split][i]
        if url.startswith("pipe:"):
            continue
        try:
            size = remote.object_size(url)
            head = remote.read_range(url, 0, 512)
        except Exception as e:  # noqa: BLE001 - any store client error becomes one line
            problems.append(f"{url}: cannot be read: {remote.reason(e)}")
            continue
        if size != info.bytes:
            problems.append(f"{url}: {size} bytes, the manifest says {info.bytes} "
                            f"(truncated or replaced)")
        elif head[257:262] != b"ustar":
            problems.append(f"{url}: does not start with a tar header (not a shard)")
    return problems


def check_jit_build(dist, rank: int, world: int) -> list[Finding]:
    """The build cache of DeepSpeed's op on each node and the stale build locks there (every
    rank looks at its own machine; the same line from several ranks is shown once)."""
    from bertscale import jitbuild

    root = jitbuild.cache_dir()
    how = ("TORCH_EXTENSIONS_DIR" if os.environ.get("TORCH_EXTENSIONS_DIR")
           else "this Python environment's own, TORCH_EXTENSIONS_DIR unset")
    default = Path.home() / ".cache" / "torch_extensions"
    mine = [(WARN, lock.advice()) for lock in jitbuild.stale_locks(root, default)]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (mine, _node_name()))
    if rank != 0:
        return []
    out, seen = [Finding("jit-build", OK, f"{root} ({how})")], set()
    for r, (found, host) in enumerate(everyone):
        for status, detail in found:
            if detail not in seen:
                seen.add(detail)
                out.append(Finding("jit-build", status, detail, r, host))
    return out


def check_wandb(disabled: bool, timeout: float = 5.0) -> Finding:
    mode = "disabled" if disabled else os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun"):
        return Finding("wandb", OK, f"{mode} (WANDB_MODE)" if not disabled else "disabled (--no-wandb)")
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base).hostname or base
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return Finding("wandb", WARN, "online mode but no API key (WANDB_API_KEY or ~/.netrc): "
                       "the run will log offline")
    url = urlparse(base)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        return Finding("wandb", WARN, f"{host}:{port} unreachable ({e.strerror or e}): the run "
                       f"will log offline (sync later with `wandb sync`)")
    return Finding("wandb", OK, f"online, {host}:{port} reachable")


def _netrc_has(host: str) -> bool:
    import netrc
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ------------------------------------------------------------------------------ running them


class _Watchdog:
    """Ends the process with a clear line if the rendezvous or a collective hangs: a missing rank
    or a wrong MASTER_ADDR otherwise hangs until the job's time limit. Each stage gets its own
    deadline (`stage(name, seconds)`)."""

    def __init__(self, timeout: float, rank: int):
        self.rank = rank
        self._done = threading.Event()
        self.stage("joining the process group", timeout)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def stage(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds
        self.deadline = time.monotonic() + seconds

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            if time.monotonic() > self.deadline:
                print(f"bertscale doctor: FAIL [rank {self.rank} on {socket.gethostname()}] timed "
                      f"out after {self.seconds:.0f}s while {self.name}: some rank is missing, "
                      f"hung or unreachable (check MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                      f"MASTER_PORT={os.environ.get('MASTER_PORT')} and the network between "
                      f"nodes)", file=sys.stderr, flush=True)
                os._exit(1)


def run_checks(cfg: DoctorConfig) -> int:
    """Every check on every rank; the exit code, the same on every rank (0 ok, 1 failed)."""
    import torch
    import torch.distributed as dist

    from bertscale import distributed

    cfg.validate()
    env = distributed.discover()
    distributed.export_env(env)
    if not cfg.cpu:
        distributed.require_usable_gpus()
    use_cuda = torch.cuda.is_available() and not cfg.cpu
    if use_cuda:
        torch.cuda.set_device(distributed.device_index(env.local_rank, torch.cuda.device_count()))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    t0 = time.monotonic()
    with _Watchdog(cfg.timeout_s, env.rank) as dog:
        # torch's own timeout is later than the watchdog's, so the clear message comes first.
        distributed.init_torch(env, "nccl" if use_cuda else "gloo", timeout_s=cfg.timeout_s + 60)
        rank, world = dist.get_rank(), dist.get_world_size()
        dog.stage("exchanging host names", cfg.timeout_s)
        findings = [check_ranks(dist, world)]
        findings += check_launch(dist, env, rank, world)
        dog.stage("running the all-reduce", cfg.timeout_s)
        findings.append(check_allreduce(dist, device, rank, world))
        dog.stage("comparing GPUs", cfg.timeout_s)
        findings += check_gpus(dist, env.local_rank, cfg.require_gpu, rank, world)
        dog.stage("checking the checkpoint folder", cfg.timeout_s)
        findings += check_checkpoint_dir(dist, cfg.checkpoint_dir, rank, world)
        # Hashing a real data set takes as long as it takes: no deadline while reading shards
        # (ranks that finish first wait in the gather, which is not a hang).
        dog.stage("reading the shards", float("inf"))
        findings += check_shards(dist, cfg.manifest, cfg.sha256, rank, world)
        dog.stage("looking for stale build locks", cfg.timeout_s)
        findings += check_jit_build(dist, rank, world)
        dog.stage("collecting the results", cfg.timeout_s)
        if rank == 0:
            findings.append(check_wandb(not cfg.wandb))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, [f for f in findings if f.status == FAIL])
        failed = [f for per_rank in gathered for f in per_rank]
        if rank == 0:
            _report(findings, failed, time.monotonic() - t0)
        dist.barrier()
        distributed.shutdown()
    return 1 if failed else 0


def _report(findings: list[Finding], failed: list[Finding], seconds: float) -> None:
    if failed:
        seen = set()
        for f in failed:
            line = f"bertscale doctor: FAIL {f.check}: {f.detail}"
            if f.host:
                line += f" [rank {f.rank} on {f.host}]"
            if line not in seen:
                seen.add(line)
                print(line, file=sys.stderr, flush=True)
        return
    width = max(len(f.check) for f in findings)
    print(f"bertscale doctor: all checks passed in {seconds:.1f}s")
    for f in findings:
        if f.status != FAIL:
            print(f"  {f.check:<{width}}  {f.status:<4}  {f.detail}")
    sys.stdout.flush()
