"""Where this NODE (pod, VM) sits in a multi-node job: what torchrun needs (`bertscale launch`
turns it into torchrun's rendezvous arguments; `doctor` reports it), and the one-process-per-node
layout `bertscale.distributed.discover` falls back to. The schedulers, in the order they are looked for:

- Kubeflow: Trainer v2's TrainJob and PyTorchJob v1 set torchrun's own environment defaults
  `PET_NNODES`, `PET_NODE_RANK`, `PET_NPROC_PER_NODE`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`
  (PyTorchJob's elastic policy: `PET_RDZV_ENDPOINT`, `PET_RDZV_ID`, `PET_NNODES` as MIN:MAX).
- SkyPilot: `SKYPILOT_NODE_RANK`, `SKYPILOT_NODE_IPS` (one per line, the head node first),
  `SKYPILOT_NUM_NODES`, `SKYPILOT_NUM_GPUS_PER_NODE`, `SKYPILOT_TASK_ID` (kept across a managed
  job's recoveries).
- An Indexed Job, alone or in a JobSet: Kubernetes sets `JOB_COMPLETION_INDEX` in each pod; pod i
  is named `<prefix>-i` in the headless service of its `subdomain`, so pod 0's stable DNS name is
  this pod's own name with the index replaced by 0, in the same domain. The node count is not in
  the pod's environment: the manifest sets `PET_NNODES` (torchrun's name for it). `JOBSET_NAME`
  (the manifest's downward-API copy of the jobset-name label) names the job.
- SLURM (`SLURM_NODEID`, `SLURM_JOB_NUM_NODES`, the first host of the node list).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from bertscale.errors import UserError


def env_int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("n[1-3],gpu7") through `scontrol show hostnames`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    except FileNotFoundError:
        raise UserError("SLURM variables are set but `scontrol` is not on PATH; "
                        "set MASTER_ADDR yourself") from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"`scontrol show hostnames {nodelist}` failed: {e.stderr.strip()}") from None
    hosts = out.split()
    if not hosts:
        raise UserError(f"SLURM node list {nodelist!r} expands to no hosts")
    return hosts


def slurm_node_address(host: str) -> str:
    """The host name if it resolves, else the node's NodeAddr from `scontrol show node` (virtual
    nodes and some sites name nodes that DNS does not know)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host], check=True, capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        return host
    for word in out.split():
        if word.startswith("NodeAddr="):
            return word.split("=", 1)[1]
    return host




DEFAULT_RDZV_PORT = 29500
"""torchrun's and Kubeflow's rendezvous port when nothing names one."""


@dataclass(frozen=True)
class NodeEnv:
    """This node's (pod's, VM's) place in a multi-node job: what torchrun needs to start this
    node's processes and meet the other nodes."""

    node_rank: int | None
    """None where the rendezvous assigns it (an elastic PyTorchJob names no node ranks)."""
    nnodes: str
    """"4", or "2:4" for an elastic range (torchrun's --nnodes)."""
    nproc_per_node: str
    """A count, or torchrun's "auto" / "gpu"."""
    master_addr: str
    """Where node 0, the rendezvous host, answers: a stable name (pod 0's DNS name, the head IP)."""
    master_port: int
    rdzv_id: str
    """The same on every node of one job and different between jobs (torchrun's --rdzv-id)."""
    scheduler: str
    """"kubeflow", "jobset", "indexed-job", "skypilot", "slurm" or "none"."""
    source: str
    """The variables it came from, for `doctor` and the launcher's first line."""

    @property
    def node_range(self) -> tuple[int, int]:
        low, _, high = self.nnodes.partition(":")
        return int(low), int(high or low)

    @property
    def elastic(self) -> bool:
        low, high = self.node_range
        return low != high

    def describe(self) -> str:
        where = "node ? (assigned at rendezvous)" if self.node_rank is None else \
            f"node {self.node_rank}"
        return (f"{where} of {self.nnodes} x {self.nproc_per_node} process(es), rendezvous "
                f"{self.master_addr}:{self.master_port} (id {self.rdzv_id}), from {self.source}")


def check_nnodes(raw: str, name: str) -> str:
    """`raw` when it is a node count N or an elastic range MIN:MAX, else one clear error."""
    low, sep, high = raw.partition(":")
    if not (low.isdigit() and (not sep or high.isdigit())) or int(low) < 1 or \
            (sep and int(high) < int(low)):
        raise UserError(f"{name}={raw!r} is not a node count (N, or MIN:MAX for an elastic job)")
    return raw


def _port(environ: Mapping[str, str], *names: str) -> int:
    name = next((n for n in names if environ.get(n)), None)
    return env_int(environ, name) if name else DEFAULT_RDZV_PORT


def _kubeflow_node(environ: Mapping[str, str]) -> NodeEnv:
    nnodes = check_nnodes(environ.get("PET_NNODES", "1"), "PET_NNODES")
    if "PET_RDZV_ENDPOINT" in environ:  # PyTorchJob with an elastic policy
        host, _, port = environ["PET_RDZV_ENDPOINT"].rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"PET_RDZV_ENDPOINT={environ['PET_RDZV_ENDPOINT']!r} is not HOST:PORT")
        addr, port_n = host, int(port)
    else:
        if not environ.get("PET_MASTER_ADDR"):
            raise UserError("PET_NODE_RANK is set but PET_MASTER_ADDR is not; a Kubeflow job sets "
                            "both (set PET_MASTER_ADDR to node 0's address)")
        # PyTorchJob's MASTER_ADDR / Trainer's PET_MASTER_ADDR: pod 0's name in the job's
        # headless service, stable across pod restarts.
        addr, port_n = environ["PET_MASTER_ADDR"], _port(environ, "PET_MASTER_PORT")
    rank = env_int(environ, "PET_NODE_RANK") if "PET_NODE_RANK" in environ else None
    names = [n for n in ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR",
                         "PET_MASTER_PORT", "PET_RDZV_ENDPOINT", "PET_RDZV_ID") if n in environ]
    kind = "PyTorchJob" if "WORLD_SIZE" in environ or "PET_RDZV_ENDPOINT" in environ else \
        "Trainer TrainJob"
    return NodeEnv(rank, nnodes, environ.get("PET_NPROC_PER_NODE", "1"), addr, port_n,
                   environ.get("PET_RDZV_ID") or addr, "kubeflow",
                   f"Kubeflow {kind} ({', '.join(names)})")


def _skypilot_node(environ: Mapping[str, str]) -> NodeEnv:
    ips = [ip.strip() for ip in environ.get("SKYPILOT_NODE_IPS", "").splitlines() if ip.strip()]
    if not ips:
        raise UserError("SKYPILOT_NODE_RANK is set but SKYPILOT_NODE_IPS is empty")
    nnodes = check_nnodes(environ.get("SKYPILOT_NUM_NODES") or str(len(ips)), "SKYPILOT_NUM_NODES")
    gpus = environ.get("SKYPILOT_NUM_GPUS_PER_NODE", "0")
    nproc = environ.get("PET_NPROC_PER_NODE") or (gpus if gpus.isdigit() and int(gpus) > 0 else "1")
    return NodeEnv(env_int(environ, "SKYPILOT_NODE_RANK"), nnodes, nproc, ips[0],
                   _port(environ, "PET_MASTER_PORT", "MASTER_PORT"),
                   environ.get("SKYPILOT_TASK_ID") or f"skypilot-{ips[0]}", "skypilot",
                   "SkyPilot (SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES, "
                   "SKYPILOT_NUM_GPUS_PER_NODE)")


def indexed_pod_zero(index: int, hostname: str, fqdn: str, subdomain: str | None = None) -> str:
    """Pod 0's DNS name from this pod's: an Indexed Job's pod i is `<prefix>-i`, reachable as
    `<prefix>-i.<subdomain>[.<namespace>.svc...]` through the job's headless service."""
    short = hostname.split(".")[0]
    suffix = f"-{index}"
    if not short.endswith(suffix):
        raise UserError(f"JOB_COMPLETION_INDEX={index} but this pod's host name {short!r} does not "
                        f"end in {suffix!r}; set PET_MASTER_ADDR to pod 0's address")
    pod0 = f"{short[:-len(suffix)]}-0"
    domain = fqdn[len(short) + 1:] if fqdn.startswith(short + ".") else (subdomain or "")
    if not domain:
        raise UserError(f"pod {short!r} has no DNS domain, so pod 0 cannot be named: give the "
                        f"pod template a `subdomain` with a headless Service of that name (a "
                        f"JobSet does), or set PET_MASTER_ADDR")
    return f"{pod0}.{domain}"


def _indexed_job_node(environ: Mapping[str, str], hostname: str, fqdn: str) -> NodeEnv:
    index = env_int(environ, "JOB_COMPLETION_INDEX")
    if "PET_NNODES" not in environ:
        raise UserError("JOB_COMPLETION_INDEX is set (an Indexed Job or JobSet pod) but "
                        "PET_NNODES is not: set it in the manifest to the number of pods "
                        "(the Job's completions), or MIN:MAX for an elastic job")
    jobset = environ.get("JOBSET_NAME")
    addr = environ.get("PET_MASTER_ADDR") or indexed_pod_zero(index, hostname, fqdn, jobset)
    kind = f"JobSet {jobset}" if jobset else "Indexed Job"
    return NodeEnv(index, check_nnodes(environ["PET_NNODES"], "PET_NNODES"),
                   environ.get("PET_NPROC_PER_NODE", "1"), addr,
                   _port(environ, "PET_MASTER_PORT", "MASTER_PORT"),
                   environ.get("PET_RDZV_ID") or jobset or addr.split(".")[0],
                   "jobset" if jobset else "indexed-job",
                   f"{kind} (JOB_COMPLETION_INDEX, PET_NNODES, pod 0 = {addr})")


def _slurm_node(environ: Mapping[str, str], *, hostnames=slurm_hostnames) -> NodeEnv:
    job = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID", "0"))
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    elif nodelist:
        addr = slurm_node_address(hostnames(nodelist)[0])
    else:
        raise UserError("SLURM_NODEID is set but SLURM_JOB_NODELIST is not; set MASTER_ADDR")
    nnodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or "1"
    gpus = environ.get("SLURM_GPUS_ON_NODE", "0")
    port = env_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else \
        20000 + (int(job) if job.isdigit() else 0) % 20000
    return NodeEnv(env_int(environ, "SLURM_NODEID"), check_nnodes(nnodes, "SLURM_JOB_NUM_NODES"),
                   gpus if gpus.isdigit() and int(gpus) > 0 else "1", addr, port,
                   f"slurm-{job}", "slurm", "SLURM (SLURM_NODEID, SLURM_JOB_NUM_NODES, node list)")


def discover_node(environ: Mapping[str, str] | None = None, *, hostname: str | None = None,
                  fqdn: str | None = None) -> NodeEnv:
    """This node's place in a multi-node job, from whichever scheduler started it (module doc).
    `hostname` / `fqdn` default to this pod's (an Indexed Job's pod 0 is named from them)."""
    environ = os.environ if environ is None else environ
    if "PET_NODE_RANK" in environ or "PET_RDZV_ENDPOINT" in environ:
        return _kubeflow_node(environ)
    if "SKYPILOT_NODE_RANK" in environ:
        return _skypilot_node(environ)
    if "JOB_COMPLETION_INDEX" in environ:
        # A container's HOSTNAME is its pod's host name (what the headless service names).
        host = hostname or environ.get("HOSTNAME") or socket.gethostname()
        return _indexed_job_node(environ, host, fqdn or socket.getfqdn(host))
    if "SLURM_NODEID" in environ and "SLURM_JOB_ID" in environ:
        return _slurm_node(environ)
    return NodeEnv(0, "1", environ.get("PET_NPROC_PER_NODE", "1"),
                   "127.0.0.1", _port(environ, "PET_MASTER_PORT", "MASTER_PORT"),
                   "bertscale-local", "none", "no multi-node scheduler (one node)")
