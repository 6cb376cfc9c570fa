"""The cloud launch files (kubernetes/, skypilot/) and the discovery behind them, without a cloud.

1. Discovery: `bertscale.nodes.discover_node` / `discover` on the environments the
   controllers set, variable for variable as their sources set them (Kubeflow Trainer v2's torch
   plugin, training-operator v1.9's PyTorchJob env generator, Kubernetes' Indexed Job and JobSet's
   pod naming, SkyPilot's documented variables).
2. The manifests against the published API models: every Kubernetes core object (the Job a
   JobSet makes from its template, PyTorchJob's pod templates) with `kubernetes-validate`'s strict
   schemas; JobSet, TrainJob and TrainingRuntime with the `kubeflow-trainer-api` models (which
   include JobSet v1alpha2's), PyTorchJob with `kubeflow-training`'s, both walked strictly (an
   unknown field fails, which the models alone would drop). SkyPilot ships no schema that loads
   without its server's dependencies: its YAMLs are checked against the task and resources keys of
   SkyPilot 0.14's task schema, copied below from its source -- a field check, NOT a real schema
   validation.
3. Each manifest's container as N real "pods": processes on 127.0.0.1 running the manifest's own
   command and environment plus what its controller injects (the DNS name of pod 0 and the port
   are the only substitutions: 127.0.0.1 and a free port). One pod gets SIGTERM (the kubelet's
   eviction); every pod must end within the manifest's terminationGracePeriodSeconds with the
   exit code its failure policy maps to a restart that counts no failure, with a committed
   checkpoint; the pods are started again (as the Job controller recreates them) and must resume
   from it and end with the uninterrupted run's losses (fp32, dropout off). SkyPilot's `run`
   script is run the same way with its variables.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from bertscale import distributed, nodes
from bertscale.errors import UserError
from launch import free_port
from pretrain_runs import cached, manifest, pretrain, train_losses  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
K8S, SKY = REPO / "kubernetes", REPO / "skypilot"
K8S_VERSION = "1.36.0"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ================================================================== 1. discovery


def test_kubeflow_trainer_v2_environment():
    """Trainer v2's torch plugin (pkg/runtime/framework/plugins/torch/torch.go): PET_NODE_RANK
    from the completion index, PET_MASTER_ADDR = <trainjob>-node-0-0.<trainjob>, port 29500."""
    env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
           "PET_MASTER_ADDR": "bert-node-0-0.bert", "PET_MASTER_PORT": "29500",
           "JOB_COMPLETION_INDEX": "2"}
    node = nodes.discover_node(env)
    assert (node.node_rank, node.nnodes, node.nproc_per_node, node.master_addr,
            node.master_port, node.scheduler) == (2, "4", "8", "bert-node-0-0.bert", 29500,
                                                  "kubeflow")
    assert "Trainer TrainJob" in node.source and node.rdzv_id == "bert-node-0-0.bert"
    # 8 processes per pod need torchrun: a lone `bertscale pretrain` in the pod says so.
    with pytest.raises(UserError, match="8 processes per node.*bertscale launch"):
        distributed.discover(env)
    one = distributed.discover({**env, "PET_NPROC_PER_NODE": "1"})
    assert one == distributed.DistEnv(2, 4, 0, 1, "bert-node-0-0.bert", 29500, "kubeflow")


def test_pytorchjob_v1_environment():
    """training-operator v1.9.4 (envvar.go, master.go, elastic.go): the master pod's name, RANK =
    the pod index (worker i -> i + 1), WORLD_SIZE = pods x nprocPerNode; with an elastic policy
    the rendezvous endpoint and a MIN:MAX node range."""
    worker = {"MASTER_ADDR": "bert-master-0", "MASTER_PORT": "23456",
              "PET_MASTER_ADDR": "bert-master-0", "PET_MASTER_PORT": "23456",
              "WORLD_SIZE": "16", "RANK": "1", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8",
              "PET_NNODES": "2", "PYTHONUNBUFFERED": "1"}
    node = nodes.discover_node(worker)
    assert (node.node_rank, node.nnodes, node.master_addr, node.master_port) == \
        (1, "2", "bert-master-0", 23456)
    assert "PyTorchJob" in node.source
    # RANK is the pod's, WORLD_SIZE counts processes: one process alone would wait forever.
    with pytest.raises(UserError, match="PET_NPROC_PER_NODE=8.*bertscale launch"):
        distributed.discover(worker)
    elastic = {"PET_RDZV_ENDPOINT": "bert-worker-0:23456", "PET_RDZV_BACKEND": "c10d",
               "PET_NNODES": "2:4", "PET_MAX_RESTARTS": "3", "PET_NPROC_PER_NODE": "8"}
    node = nodes.discover_node(elastic)
    assert (node.node_rank, node.nnodes, node.elastic, node.master_addr, node.master_port) == \
        (None, "2:4", True, "bert-worker-0", 23456)
    with pytest.raises(UserError, match="elastic node range"):
        distributed.discover({**elastic, "PET_NPROC_PER_NODE": "1"})


def test_jobset_and_indexed_job_environment():
    """Kubernetes sets JOB_COMPLETION_INDEX; JobSet names pod i <jobset>-<job>-<j>-<i> in the
    headless service <jobset> (jobset_types.go, Network); pod 0 is named from this pod's name."""
    env = {"JOB_COMPLETION_INDEX": "3", "PET_NNODES": "4", "PET_NPROC_PER_NODE": "8",
           "JOBSET_NAME": "bert"}
    node = nodes.discover_node(
        env, hostname="bert-node-0-3", fqdn="bert-node-0-3.bert.default.svc.cluster.local")
    assert (node.node_rank, node.nnodes, node.master_addr, node.master_port, node.rdzv_id,
            node.scheduler) == (3, "4", "bert-node-0-0.bert.default.svc.cluster.local",
                                29500, "bert", "jobset")
    # /etc/hosts without the domain: JobSet's default subdomain is the JobSet's name.
    assert nodes.discover_node(env, hostname="bert-node-0-3", fqdn="bert-node-0-3") \
        .master_addr == "bert-node-0-0.bert"
    # A plain Indexed Job with a headless service `train` (pod names job-<index>).
    plain = nodes.discover_node({"JOB_COMPLETION_INDEX": "12", "PET_NNODES": "16"},
                                      hostname="train-12", fqdn="train-12.train.ns.svc")
    assert (plain.master_addr, plain.scheduler, plain.rdzv_id) == \
        ("train-0.train.ns.svc", "indexed-job", "train-0")
    with pytest.raises(UserError, match="subdomain"):
        nodes.discover_node({"JOB_COMPLETION_INDEX": "1", "PET_NNODES": "2"},
                                  hostname="x-1", fqdn="x-1")
    with pytest.raises(UserError, match="PET_NNODES is not"):
        nodes.discover_node({"JOB_COMPLETION_INDEX": "1"}, hostname="x-1", fqdn="x-1.s")
    with pytest.raises(UserError, match="PET_NNODES='two'"):
        nodes.discover_node({**env, "PET_NNODES": "two"}, hostname="bert-node-0-3",
                                  fqdn="bert-node-0-3.bert")
    one = distributed.discover({**env, "PET_NPROC_PER_NODE": "1", "HOSTNAME": "bert-node-0-3"})
    assert (one.rank, one.world_size, one.launcher) == (3, 4, "jobset")


def test_skypilot_environment():
    env = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.9\n",
           "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "8",
           "SKYPILOT_TASK_ID": "sky-managed-2026-12-01_job_7"}
    node = nodes.discover_node(env)
    assert (node.node_rank, node.nnodes, node.nproc_per_node, node.master_addr,
            node.rdzv_id, node.scheduler) == (1, "2", "8", "10.0.0.5",
                                              "sky-managed-2026-12-01_job_7", "skypilot")
    cpu = {**env, "SKYPILOT_NUM_GPUS_PER_NODE": "0"}
    assert distributed.discover(cpu) == distributed.DistEnv(1, 2, 0, 1, "10.0.0.5", 29500,
                                                            "skypilot")
    with pytest.raises(UserError, match="SKYPILOT_NODE_IPS is empty"):
        nodes.discover_node({"SKYPILOT_NODE_RANK": "0"})


def test_launch_builds_the_torchrun_command():
    """`bertscale launch --print`: the torchrun line for a JobSet pod, and for one node alone."""
    env = {**os.environ, "JOB_COMPLETION_INDEX": "1", "PET_NNODES": "2",
           "PET_NPROC_PER_NODE": "8", "JOBSET_NAME": "bert", "HOSTNAME": "bert-node-0-1"}
    out = subprocess.run([sys.executable, "-m", "bertscale", "launch", "--print", "pretrain",
                          "tiny_ci"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    assert argv[argv.index("--rdzv-endpoint") + 1] == "bert-node-0-0.bert:29500"
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--rdzv-id") + 1] == "bert"
    assert argv[argv.index("--nproc-per-node") + 1] == "8"
    assert argv[-4:] == ["-m", "bertscale", "pretrain", "tiny_ci"]
    elastic = subprocess.run([sys.executable, "-m", "bertscale", "launch", "--print",
                              "--nnodes", "1:2", "pretrain", "x"],
                             env=env, capture_output=True, text=True, timeout=60).stdout.split()
    assert elastic[elastic.index("--max-restarts") + 1] == "3"
    bad = subprocess.run([sys.executable, "-m", "bertscale", "launch", "--nnodes", "3:1",
                          "pretrain", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--nnodes='3:1' is not a node count" in bad.stderr


# ================================================================== 2. the API models


def _pydantic_problems(cls: type, data: typing.Any, path: str) -> list[str]:
    """Unknown fields, recursively, of a kubeflow_trainer_api model (pydantic ignores them)."""
    from pydantic import BaseModel
    if not isinstance(data, dict):
        return []
    fields = {f.alias or name: f.annotation for name, f in cls.model_fields.items()}
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{path}.{key}: not a field of {cls.__name__}")
            continue
        for inner in _models_in(fields[key], BaseModel):
            items = value if isinstance(value, list) else \
                list(value.values()) if isinstance(value, dict) and _is_dict(fields[key]) else [value]
            for i, item in enumerate(items):
                problems += _pydantic_problems(inner, item, f"{path}.{key}[{i}]")
    return problems


def _is_dict(annotation: typing.Any) -> bool:
    return any(typing.get_origin(a) is dict for a in [annotation, *typing.get_args(annotation)])


def _models_in(annotation: typing.Any, base: type) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, base):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a, base)]


def validate_trainer_api(doc: dict, model: str) -> None:
    """Strict check with a kubeflow_trainer_api model: types by the model, unknown keys by us."""
    import kubeflow_trainer_api.models as models
    cls = getattr(models, model)
    problems = _pydantic_problems(cls, doc, doc["kind"])
    assert not problems, problems
    cls.from_dict(doc)  # raises on a wrong type or a missing required field


def validate_openapi_model(cls: type, data: typing.Any, path: str) -> list[str]:
    """Strict walk of an openapi-generator model (kubeflow.training, kubernetes.client)."""
    import kubeflow.training.models as kf
    import kubernetes.client.models as k8s
    if not isinstance(data, dict):
        return [f"{path}: expected an object for {cls.__name__}"]
    json_to_attr = {v: k for k, v in cls.attribute_map.items()}
    problems = []
    for key, value in data.items():
        if key not in json_to_attr:
            problems.append(f"{path}.{key}: not a field of {cls.__name__}")
            continue
        problems += _check_openapi_type(cls.openapi_types[json_to_attr[key]], value,
                                        f"{path}.{key}", (kf, k8s))
    return problems


def _check_openapi_type(kind: str, value: typing.Any, path: str, modules) -> list[str]:
    if kind.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in
                _check_openapi_type(kind[5:-1], v, f"{path}[{i}]", modules)]
    if kind.startswith("dict("):
        inner = kind[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        return [p for k, v in value.items() for p in
                _check_openapi_type(inner, v, f"{path}.{k}", modules)]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if kind in simple:
        ok = isinstance(value, simple[kind]) and not (kind == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {kind}, got {value!r}"]
    cls = next((getattr(m, kind) for m in modules if hasattr(m, kind)), None)
    assert cls is not None, f"no model {kind}"
    return validate_openapi_model(cls, value, path)


def validate_core(kind: str, api_version: str, body: dict) -> None:
    """A Kubernetes core object against kubernetes-validate's strict schema."""
    import kubernetes_validate
    kubernetes_validate.validate({"apiVersion": api_version, "kind": kind,
                                  "metadata": {"name": "check"}, **body}, K8S_VERSION, strict=True)


def _job_of(replicated: dict) -> dict:
    return {"spec": replicated["template"]["spec"]}


def validate_jobset(doc: dict) -> None:
    validate_trainer_api(doc, "JobsetV1alpha2JobSet")
    for rj in doc["spec"]["replicatedJobs"]:
        validate_core("Job", "batch/v1", _job_of(rj))  # the Job JobSet creates from it


def validate_trainjob(runtime: dict, job: dict) -> None:
    validate_trainer_api(runtime, "TrainerV1alpha1TrainingRuntime")
    validate_trainer_api(job, "TrainerV1alpha1TrainJob")
    for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        validate_core("Job", "batch/v1", _job_of(rj))
    trainer = job["spec"]["trainer"]
    container = {"name": "node", "image": trainer["image"], "command": trainer["command"],
                 "args": trainer["args"], "env": trainer["env"],
                 "resources": trainer["resourcesPerNode"]}
    validate_core("Pod", "v1", {"spec": {"containers": [container]}})


def validate_pytorchjob(doc: dict) -> None:
    from kubeflow.training.models import KubeflowOrgV1PyTorchJob
    problems = validate_openapi_model(KubeflowOrgV1PyTorchJob, doc, "PyTorchJob")
    assert not problems, problems
    for name, replica in doc["spec"]["pytorchReplicaSpecs"].items():
        assert replica["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode"), name
        validate_core("PodTemplate", "v1", {"template": replica["template"]})


# SkyPilot 0.14's task schema (sky/utils/schemas.py, get_task_schema and the resources schema):
# the keys each level allows. A copy of field names, not the schema.
SKY_TASK_KEYS = {"name", "workdir", "event_callback", "num_nodes", "resources", "file_mounts",
                 "service", "pool", "setup", "run", "envs", "secrets", "managed_secrets",
                 "inputs", "outputs", "file_mounts_mapping", "volumes", "volume_mounts",
                 "api_server_access"}
SKY_RESOURCES_KEYS = {"cloud", "region", "zone", "infra", "cpus", "memory", "accelerators",
                      "instance_type", "use_spot", "job_recovery", "volumes", "disk_size",
                      "ephemeral_storage", "disk_tier", "network_tier", "local_disk",
                      "max_hourly_cost", "ports", "labels", "accelerator_args", "image_id",
                      "priority", "priority_class"}
SKY_RECOVERY_KEYS = {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}


def check_skypilot_fields(doc: dict) -> list[str]:
    problems = [f"task.{k}" for k in doc if k not in SKY_TASK_KEYS]
    res = doc.get("resources", {})
    problems += [f"resources.{k}" for k in res if k not in SKY_RESOURCES_KEYS]
    problems += [f"resources.job_recovery.{k}" for k in res.get("job_recovery", {})
                 if k not in SKY_RECOVERY_KEYS]
    problems += [f"envs.{k}" for k in doc.get("envs", {})
                 if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    return problems


def test_manifests_validate_against_the_published_api_models():
    jobset, = docs(K8S / "jobset.yaml")
    validate_jobset(jobset)
    runtime, job = docs(K8S / "trainjob.yaml")
    validate_trainjob(runtime, job)
    validate_pytorchjob(docs(K8S / "pytorchjob.yaml")[0])
    for path in SKY.glob("*.yaml"):
        assert not check_skypilot_fields(docs(path)[0]), path.name


def test_the_validators_catch_mistakes():
    """Each validator fails on a real kind of mistake (so the test above can fail)."""
    import kubernetes_validate
    jobset, = docs(K8S / "jobset.yaml")
    bad = json.loads(json.dumps(jobset))
    bad["spec"]["failurePolicy"]["maxRestart"] = 3                        # a JobSet typo
    with pytest.raises(AssertionError, match="maxRestart: not a field"):
        validate_jobset(bad)
    bad = json.loads(json.dumps(jobset))
    rj = bad["spec"]["replicatedJobs"][0]
    rj["template"]["spec"]["template"]["spec"]["terminationGracePeriod"] = 120   # a pod typo
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        validate_core("Job", "batch/v1", _job_of(rj))
    with pytest.raises(AssertionError, match="terminationGracePeriod: not a field"):
        validate_jobset(bad)
    bad = json.loads(json.dumps(jobset))
    rj = bad["spec"]["replicatedJobs"][0]
    rj["template"]["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] = ["75"]
    with pytest.raises(kubernetes_validate.ValidationError):               # a string exit code
        validate_core("Job", "batch/v1", _job_of(rj))
    with pytest.raises(ValueError):   # pydantic's ValidationError is a ValueError
        validate_jobset(bad)
    runtime, job = docs(K8S / "trainjob.yaml")
    job["spec"]["trainer"]["numProcsPerNode"] = 8
    with pytest.raises(AssertionError, match="numProcsPerNode: not a field"):
        validate_trainjob(runtime, job)
    pt = docs(K8S / "pytorchjob.yaml")[0]
    pt["spec"]["elasticPolicy"] = {"minReplica": 1}
    with pytest.raises(AssertionError, match="minReplica: not a field"):
        validate_pytorchjob(pt)
    sky = docs(SKY / "pretrain.yaml")[0]
    sky["resources"]["spot"] = True
    assert check_skypilot_fields(sky) == ["resources.spot"]


def test_the_manifests_agree_with_themselves():
    """The numbers that must match across one manifest: the pod count and PET_NNODES, the GPU
    limit and the processes per pod, the shutdown timeout inside the grace period, /dev/shm as
    memory, and the failure policy's exit code list naming the preemption code."""
    jobset, = docs(K8S / "jobset.yaml")
    spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = spec["template"]["spec"]
    c, = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert spec["completions"] == spec["parallelism"] == int(env["PET_NNODES"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == env["PET_NPROC_PER_NODE"]
    assert int(env["BERTSCALE_SHUTDOWN_TIMEOUT"]) < pod["terminationGracePeriodSeconds"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never"
    assert "BERTSCALE_RUN_DIR" in env and "$BERTSCALE_RUN_DIR" in c["args"][0]
    runtime, job = docs(K8S / "trainjob.yaml")
    rpod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert rpod["podFailurePolicy"] == spec["podFailurePolicy"]
    tenv = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"]}
    assert int(tenv["BERTSCALE_SHUTDOWN_TIMEOUT"]) < \
        rpod["template"]["spec"]["terminationGracePeriodSeconds"]
    assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == \
        str(job["spec"]["trainer"]["numProcPerNode"])


# ================================================================== 3. pods on 127.0.0.1


def pod_action(kind: str, doc: dict, exit_code: int) -> str:
    """What the manifest's failure policy does with a pod that exited `exit_code`, by the
    controller's documented rules: a Job's podFailurePolicy (the first matching rule; none:
    the failure counts against backoffLimit), PyTorchJob v1's restartPolicy ExitCode (the
    operator recreates the pod for codes >= 128, fails the job on others)."""
    if kind == "PyTorchJob":
        return "Restart" if exit_code >= 128 else "FailJob"
    rules = job_template(kind, doc)["podFailurePolicy"]["rules"]
    for rule in rules:
        codes = rule.get("onExitCodes")
        if codes and (exit_code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"


def job_template(kind: str, doc: dict) -> dict:
    if kind == "TrainJob":
        doc = doc["runtime"]
    return doc["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"] \
        if kind == "TrainJob" else doc["spec"]["replicatedJobs"][0]["template"]["spec"]


def _env_list(items: list[dict], labels: dict[str, str]) -> dict[str, str]:
    """A container's env as the kubelet resolves it: values, $(VAR) from earlier entries,
    downward-API labels."""
    out: dict[str, str] = {}
    for e in items:
        if "value" in e:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), e["value"])
        else:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.labels\['(.+)'\]", field)
            assert key, f"downward API field {field} not modelled"
            out[e["name"]] = labels[key[1]]
    return out


def pods_of(kind: str, doc: dict) -> tuple[list[dict[str, str]], list[str], int]:
    """Each pod's environment (the manifest's plus its controller's), the container's argv,
    the grace period: as the controllers of kubernetes/*.yaml build them."""
    if kind == "JobSet":
        name, rj = doc["metadata"]["name"], doc["spec"]["replicatedJobs"][0]
        pod = rj["template"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        n = rj["template"]["spec"]["completions"]
        labels = {"jobset.sigs.k8s.io/jobset-name": name}
        base = _env_list(c["env"], labels)
        envs = [{**base, "JOB_COMPLETION_INDEX": str(i),          # Kubernetes, Indexed Job
                 "HOSTNAME": f"{name}-{rj['name']}-0-{i}"} for i in range(n)]
        return envs, [*c["command"], *c["args"]], pod["terminationGracePeriodSeconds"]
    if kind == "TrainJob":
        job = doc["job"]
        name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
        pod = job_template(kind, doc)["template"]["spec"]
        n = trainer["numNodes"]
        base = _env_list(trainer["env"], {})
        envs = [{**base, "JOB_COMPLETION_INDEX": str(i), "HOSTNAME": f"{name}-node-0-{i}",
                 # Trainer's torch plugin (torch.go, EnforceMLPolicy)
                 "PET_NNODES": str(n), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                 "PET_NODE_RANK": str(i), "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
                 "PET_MASTER_PORT": "29500"} for i in range(n)]
        return envs, [*trainer["command"], *trainer["args"]], pod["terminationGracePeriodSeconds"]
    assert kind == "PyTorchJob"
    name, specs = doc["metadata"]["name"], doc["spec"]["pytorchReplicaSpecs"]
    nproc = doc["spec"]["nprocPerNode"]
    total = sum(s["replicas"] for s in specs.values())
    pod = specs["Master"]["template"]["spec"]
    c = pod["containers"][0]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "pytorchjob-port")
    envs = []
    for rtype, index in [("master", 0)] + [("worker", i) for i in range(specs["Worker"]["replicas"])]:
        rank = index + (1 if rtype == "worker" else 0)
        # training-operator v1.9.4 setPodEnv / MasterEnvVarGenerator
        envs.append({**_env_list(c["env"], {}), "PYTHONUNBUFFERED": "1",
                     "MASTER_ADDR": f"{name}-master-0", "PET_MASTER_ADDR": f"{name}-master-0",
                     "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
                     "WORLD_SIZE": str(total * int(nproc)), "RANK": str(rank),
                     "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": nproc,
                     "PET_NNODES": str(total), "HOSTNAME": f"{name}-{rtype}-{index}"})
    return envs, [*c["command"], *c["args"]], pod["terminationGracePeriodSeconds"]


def load_kind(kind: str) -> dict:
    if kind == "JobSet":
        return docs(K8S / "jobset.yaml")[0]
    if kind == "TrainJob":
        runtime, job = docs(K8S / "trainjob.yaml")
        return {"runtime": runtime, "job": job}
    return docs(K8S / "pytorchjob.yaml")[0]


def shrink(kind: str, doc: dict) -> dict:
    """2 pods x 1 process (a CPU test machine), everything else as written."""
    doc = json.loads(json.dumps(doc))
    if kind == "JobSet":
        spec = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
        spec["completions"] = spec["parallelism"] = 2
        for e in spec["template"]["spec"]["containers"][0]["env"]:
            if e["name"] in ("PET_NNODES", "PET_NPROC_PER_NODE"):
                e["value"] = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"}[e["name"]]
    elif kind == "TrainJob":
        doc["job"]["spec"]["trainer"].update(numNodes=2, numProcPerNode=1)
    else:
        doc["spec"]["nprocPerNode"] = "1"
        doc["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 1
    return doc


TRAIN = ("--no-wandb --set train.steps=6 --set train.global_batch_size=8 "
         "--set train.micro_batch_size=2 --set checkpoint.every=2 --set eval.at_start=false "
         "--set eval.every=0 --set schedule.warmup=1 --set data.verify_sha256=false "
         "--set model.hidden_dropout_prob=0.0 --set model.attention_probs_dropout_prob=0.0")
STEPS = 6


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run on 2 ranks (no launcher: the losses do not depend on it)."""
    def build():
        run = tmp_path_factory.mktemp("k8s_ref") / "run"
        pretrain(run, manifest, 2, *[a for a in shlex.split(TRAIN) if a not in ("--set",
                                                                               "--no-wandb")])
        return train_losses(run)
    return cached("k8s_reference", build)


class Pods:
    """N pod processes on this machine: the container's argv under bash's PATH with the venv's
    bin first (the image has `bertscale` on PATH), each in its own session like a container."""

    def __init__(self, argv: list[str], envs: list[dict[str, str]], logs: Path, tag: str):
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.logs = [logs / f"{tag}-pod{i}.log" for i in range(len(envs))]
        self.procs = [subprocess.Popen(argv, env={**os.environ, **env, "PATH": path},
                                       stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
                      for env, log in zip(envs, self.logs)]

    def text(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait_for(self, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(what in self.text(i) for i in range(len(self.logs))):
                return
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        raise AssertionError(f"{what!r} not seen:\n" + self.tails())

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def tails(self) -> str:
        return "\n".join(f"--- pod {i}\n{self.text(i)[-3000:]}" for i in range(len(self.logs)))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def run_preempt_resume(argv: list[str], envs: list[dict[str, str]], grace: int,
                       action, tmp_path: Path, reference: dict[int, float],
                       store=None) -> str:
    """Start the pods, SIGTERM pod 1 after checkpoint 2, check every pod's exit code and what
    the policy does with it, start them again, check the resume and the losses. With `store`
    (tests/stores.py) the run folder is a URL in it, each pod staging on its own folder
    (BERTSCALE_STAGING_DIR): the commit and the losses are read from the store, the preemption
    record from the staging copy of rank 0's pod."""
    run = Path(envs[0]["BERTSCALE_RUN_DIR"])
    if store is not None:
        url = envs[0]["BERTSCALE_RUN_DIR"]
    pods = Pods(argv, envs, tmp_path, "first")
    try:
        pods.wait_for("checkpoint step 2 committed")
        t0 = time.monotonic()
        pods.procs[1].send_signal(signal.SIGTERM)      # the kubelet, to the container's PID 1
        codes = pods.wait(grace)
        took = time.monotonic() - t0
    finally:
        pods.kill()
    assert None not in codes, f"pods still running {grace}s after SIGTERM:\n{pods.tails()}"
    assert "Traceback" not in pods.text(0) + pods.text(1), pods.tails()  # lines, not tracebacks
    actions = {action(c) for c in codes}
    assert len(set(codes)) == 1 and actions <= {"Ignore", "Restart"}, (codes, pods.tails())
    if store is not None:  # rank 0's node: the rendezvous decides which pod that is
        run = next(p for env in envs for p in Path(env["BERTSCALE_STAGING_DIR"]).iterdir()
                   if (p / "preempted.json").exists())
    record = json.loads((run / "preempted.json").read_text())
    stopped = record["step"]
    assert 2 <= stopped < STEPS and (run / "checkpoints" / f"step_{stopped}" / "commit.json").exists()
    if store is not None:  # committed in the store before any pod exited
        fs = store.fs()
        fs.invalidate_cache()
        assert fs.exists(f"{url}/checkpoints/step_{stopped}/commit.json"), fs.find(url)
    again = Pods(argv, envs, tmp_path, "again")
    try:
        codes2 = again.wait(400)
    finally:
        again.kill()
    assert codes2 == [0, 0], again.tails()
    text = again.text(0) + again.text(1)
    resumed = (f"resumed from {run / 'checkpoints' / f'step_{stopped}'}" if store is None else
               f"/checkpoints/step_{stopped} (step {stopped}, ")  # some pod's staging copy
    assert resumed in text, again.tails()
    if store is None:
        losses = train_losses(run)
    else:  # the records the run put in the store
        fs.invalidate_cache()
        losses = {r["step"]: r["loss"] for r in map(json.loads, fs.cat_file(
            f"{url}/metrics.jsonl").decode().splitlines()) if r["kind"] == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6), step
    return (f"SIGTERM -> every pod exited {codes[0]} ({action(codes[0])}) in {took:.1f}s "
            f"(grace {grace}s), checkpoint step {stopped} committed; resumed and matched the "
            f"uninterrupted run's {STEPS} losses")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["JobSet", "TrainJob", "PyTorchJob"])
def test_manifest_pods_preempt_and_resume(kind, manifest, reference, tmp_path):
    doc = shrink(kind, load_kind(kind))
    envs, argv, grace = pods_of(kind, doc)
    assert argv[:2] == ["bash", "-c"] and "bertscale launch" in argv[2]
    # What the controller's DNS would give (pod 0's name): the launcher must name it ...
    printed = subprocess.run(
        [sys.executable, "-m", "bertscale", "launch", "--print", "pretrain", "x"],
        env={**os.environ, **envs[1]}, capture_output=True, text=True, timeout=60).stdout.split()
    endpoint = printed[printed.index("--rdzv-endpoint") + 1]
    expected = {"JobSet": "bert-large-p1-node-0-0.bert-large-p1:29500",
                "TrainJob": "bert-large-p1-node-0-0.bert-large-p1:29500",
                "PyTorchJob": "bert-large-p1-master-0:23456"}[kind]
    assert endpoint == expected
    # ... and here, without cluster DNS, pod 0 is 127.0.0.1 on a free port.
    on_this_machine(envs, tmp_path / "run", manifest)
    print(kind + ": " + run_preempt_resume(argv, envs, grace, lambda c: pod_action(kind, doc, c),
                                           tmp_path, reference))
    assert pod_action(kind, doc, 2) in ("FailJob",) and pod_action(kind, doc, 3) == "FailJob"


def on_this_machine(envs: list[dict[str, str]], run: Path, manifest: Path) -> None:
    """The pods' environments on this machine: pod 0 is 127.0.0.1 on a free port (no cluster
    DNS); the run folder, the recipe and its data."""
    port = str(free_port())
    for env in envs:
        env.update(BERTSCALE_RUN_DIR=str(run), BERTSCALE_RECIPE="tiny_ci",
                   BERTSCALE_ARGS=f"--set data.manifest={json.dumps(str(manifest))} {TRAIN}",
                   PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo")
        if "MASTER_ADDR" in env:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["JobSet", "TrainJob"])
def test_bad_input_fails_the_job_instead_of_retrying_it(kind, tmp_path):
    """A run that cannot start (here: its data manifest is missing) stops every worker with exit
    2 and one line; the pod must exit 2 too, since that is the code on which the manifest's pod
    failure policy fails the Job at once instead of recreating the pods backoffLimit times (and
    the JobSet maxRestarts times more). Before the fix the pod exited 1 (torchrun's code for
    any failed worker), which the policy counts and retries, after a Python traceback from
    torchrun's agent."""
    doc = shrink(kind, load_kind(kind))
    envs, argv, grace = pods_of(kind, doc)
    run = tmp_path / "run"
    on_this_machine(envs, run, tmp_path / "missing" / "manifest.json")
    pods = Pods(argv, envs, tmp_path, "bad")
    try:
        codes = pods.wait(120)
    finally:
        pods.kill()
    assert codes == [2, 2], pods.tails()
    assert {pod_action(kind, doc, c) for c in codes} == {"FailJob"}
    for i in range(len(envs)):
        log = pods.text(i)
        assert "Traceback" not in log, log[-3000:]
        said = [x for x in log.splitlines() if "bertscale pretrain: error:" in x]
        assert said and all("missing" in x and "manifest.json" in x for x in said), log[-3000:]
        assert re.search(r"bertscale launch: .*exited 2", log), log[-3000:]
    assert not run.exists()


@pytest.mark.slow
def test_skypilot_multinode_run_preempts_and_resumes(store, manifest, reference, tmp_path):
    """skypilot/pretrain-multinode.yaml's `run` on 2 "nodes" with SkyPilot's variables and its
    run location, a bucket (moto's S3 here: only the bucket's name is replaced), each node
    staging on its own disk; a preempted node's exit code is one job_recovery recovers on
    (recover_on_exit_codes), and every node exits only after the checkpoint is committed in
    the bucket (the preemption save uploads synchronously)."""
    task = docs(SKY / "pretrain-multinode.yaml")[0]
    recover = task["resources"]["job_recovery"]["recover_on_exit_codes"]
    run_url = task["envs"]["BERTSCALE_RUN_DIR"]
    assert run_url.startswith("s3://my-bucket/")
    run_url = run_url.replace("s3://my-bucket", store.prefix)
    port = str(free_port())  # the head node's: every node must name the same one
    envs = [{**{k: str(v) for k, v in task["envs"].items()},
             "SKYPILOT_NODE_RANK": str(i), "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1\n",
             "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "0",
             "SKYPILOT_TASK_ID": "sky-managed-test_bertscale_1", "PET_MASTER_PORT": port,
             "BERTSCALE_RUN_DIR": run_url, "BERTSCALE_STAGING_DIR": str(tmp_path / f"node{i}"),
             "BERTSCALE_RECIPE": "tiny_ci",
             "BERTSCALE_ARGS": f"--set data.manifest={json.dumps(str(manifest))} {TRAIN}",
             "GLOO_SOCKET_IFNAME": "lo"} for i in range(2)]
    argv = ["bash", "-c", task["run"]]
    print("SkyPilot: " + run_preempt_resume(
        argv, envs, 120, lambda c: "Restart" if c in recover else "Count", tmp_path, reference,
        store=store))


@pytest.mark.slow
def test_doctor_reports_the_scheduler(tmp_path):
    """`bertscale doctor` on 2 ranks of a SkyPilot node: its `launch` line names the scheduler,
    the node count and the rendezvous it would use."""
    from launch import run_ranks
    env = {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.9",
           "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "0",
           "SKYPILOT_TASK_ID": "sky-managed-doctor_1", "WANDB_MODE": "offline"}
    results = run_ranks(["-m", "bertscale", "doctor", "--run-dir", str(tmp_path / "run")], 2,
                        env=env, check=False, timeout=180)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    line = next(x for x in results[0].stdout.splitlines() if x.strip().startswith("launch"))
    assert "started by a launcher's RANK/WORLD_SIZE; SkyPilot (SKYPILOT_NODE_RANK" in line, line
    # The port is the launcher's MASTER_PORT here (SkyPilot names none).
    assert re.search(r"2 node\(s\), rendezvous 10\.0\.0\.5:\d+ \(id sky-managed-doctor_1\)",
                     line), line
