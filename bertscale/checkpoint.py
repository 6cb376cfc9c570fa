"""Checkpoints that are complete or ignored, and the consolidated weights inside them.

Layout of a run folder:

    <run>/vocab.txt                        the tokenizer the run trains with (copied at start)
    <run>/checkpoints/step_<N>/            DeepSpeed's files for tag "step_<N>" (every rank writes
                                           its own partition) plus ours:
        trainer_state.json                 counters, recipe, hashes, model config (rank 0)
        rng_rank<R>.pt                     python / numpy / torch RNG states of rank R
        commit.json                        THE commit marker: written last, atomically
    <run>/checkpoints/step_<N>_universal/  (elastic resume) DeepSpeed's universal conversion

Saving (`save`, collective): every rank calls `engine.save_checkpoint` and writes its RNG file,
fsyncs what it wrote, then a barrier; rank 0 fsyncs the folder and writes `commit.json` (temp
file, fsync, rename, fsync of the directory) naming the step; a second barrier keeps any rank from
exiting (and a launcher from killing rank 0) before the commit exists. A folder without
`commit.json` is an interrupted save: `latest_committed` never returns it, whatever DeepSpeed's own
`latest` file says (we do not write that file). After each commit rank 0 deletes all but the newest
`keep` committed checkpoints, un-committing each (marker first) before removing its files.

The trainer state holds what a resume needs to continue the same run and to refuse a different one:
the step and skip count, the loader's own state dict under "data" (its global `consumed_samples`,
also kept at the top level as format 1 had it), the recipe, the model config, the tokenizer hash
and the manifest fingerprint (bertscale.pretraining.checkpointer assembles it). DeepSpeed's `universal_checkpoint_info`, which
`ds_to_universal` requires, is set on the model (DeepSpeed reserves that key in client_state and
stores it from the module attribute; see `mark_universal`).

`load_consolidated` rebuilds full fp32 weights from any ZeRO stage in one process, without a
process group (DeepSpeed's zero_to_fp32), for fine-tuning and export.

Limits: the checkpoint folder must be one filesystem visible to all ranks (rank 0 commits what the
others wrote). fsync is what makes the commit meaningful on a local disk; on network filesystems
it is as strong as the filesystem's close-to-open semantics.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bertscale.config import ModelConfig, from_dict, to_dict
from bertscale.errors import UserError
from bertscale.files import fsync_path, torch_save_atomic, write_json_atomic
from bertscale.files import human_size as size_text
from bertscale.seeding import rng_state, set_rng_state

COMMIT_FILE = "commit.json"
STATE_FILE = "trainer_state.json"
VOCAB_FILE = "vocab.txt"
FORMAT_VERSION = 1
_TAG = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step}"


@dataclass(frozen=True)
class Committed:
    """A committed checkpoint: `path` is <run>/checkpoints/step_<N>."""

    step: int
    path: Path
    marker: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def root(self) -> Path:
        """The `save_dir` DeepSpeed was given (the checkpoints folder)."""
        return self.path.parent

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent


# ------------------------------------------------------------------------------ finding


def _read_marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((tag_dir / COMMIT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # The marker is renamed into place complete, so this is outside damage: say so.
        raise UserError(f"{tag_dir / COMMIT_FILE}: commit marker is not valid JSON ({e})") from None
    if not isinstance(marker, dict) or marker.get("tag") != tag_dir.name:
        raise UserError(f"{tag_dir / COMMIT_FILE}: commit marker does not name this checkpoint "
                        f"({marker.get('tag') if isinstance(marker, dict) else marker!r})")
    return marker


def list_committed(run_dir: str | Path) -> list[Committed]:
    """Committed checkpoints of a run folder, oldest first. Uncommitted folders are skipped."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _TAG.match(p.name)
            if m and p.is_dir():
                marker = _read_marker(p)
                if marker is not None:
                    found.append(Committed(int(m.group(1)), p, marker))
    return sorted(found, key=lambda c: c.step)


def latest_committed(run_dir: str | Path) -> Committed | None:
    committed = list_committed(run_dir)
    return committed[-1] if committed else None


def resolve(path: str | Path) -> Committed:
    """A run folder (its newest committed checkpoint) or one checkpoint folder (which must be
    committed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint folder")
    if _TAG.match(path.name) and path.is_dir():
        marker = _read_marker(path)
        if marker is None:
            raise UserError(f"{path}: checkpoint was never committed (interrupted save); "
                            f"use the run folder to get the newest committed one")
        return Committed(int(marker["step"]), path, marker)
    if path.name == "checkpoints":
        path = path.parent
    latest = latest_committed(path)
    if latest is None:
        raise UserError(f"{path}: no committed checkpoint in {checkpoints_dir(path)}")
    return latest


def read_state(ckpt: Committed) -> dict[str, Any]:
    try:
        return json.loads((ckpt.path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{ckpt.path}: committed but has no {STATE_FILE}") from None


# ------------------------------------------------------------------------------ saving


def mark_universal(model: Any) -> None:
    """Set what DeepSpeed's ds_to_universal requires. DeepSpeed saves the module attribute
    `universal_checkpoint_info` into the model-states file (the key is reserved in client_state).
    A purely data-parallel model needs only the format version."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    setattr(model, UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def _written_by(name: str, rank: int) -> bool:
    """Which files of a DeepSpeed tag folder this rank wrote (so it fsyncs exactly those)."""
    if f"zero_pp_rank_{rank}_" in name or name == f"rng_rank{rank}.pt":
        return True
    return rank == 0 and (name.startswith("mp_rank_") or name == STATE_FILE)


# Bytes per parameter of a first checkpoint, before there is a previous one to measure: the
# module weights (fp32, or bf16/fp16) plus fp32 master weights and two Adam/LAMB moments.
_BYTES_PER_PARAM = 16
# Write failures that mean "the filesystem would not take it": torch.save reports a short write
# from its C++ writer as a RuntimeError, not an OSError.
_WRITE_FAILURE = ("inline_container", "file write failed", "unexpected pos", "No space left",
                  "Disk quota exceeded")


def bytes_on_disk(path: Path) -> int:
    """Total size of the files under `path` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (or its parent).
    Quotas (Lustre, NFS) are not visible here: a write past a quota fails at write time."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def space_problem(folder: Path, needed: int, what: str) -> str | None:
    """A one-line refusal when `folder`'s filesystem has less than `needed` bytes free."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (f"{what}: {folder} has {size_text(free)} free, about {size_text(needed)} are needed; "
            f"free space there (or lower checkpoint.keep) and resume")


def checkpoint_bytes_estimate(run_dir: Path, engine: Any) -> int:
    """What the next checkpoint will take: the newest committed one's size, else an estimate
    from the parameter count (ZeRO-3 parameters report their full size as ds_numel)."""
    latest = latest_committed(run_dir)
    if latest is not None:
        return bytes_on_disk(latest.path)
    n = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    return n * _BYTES_PER_PARAM


def is_write_failure(e: BaseException, folder: Path) -> bool:
    """Whether `e`, raised while writing into `folder`, means the filesystem would not take the
    write. A full filesystem counts whatever the message: what a writer raises there varies (a
    directory that could not be made surfaces later as "Parent directory … does not exist")."""
    if isinstance(e, OSError) or any(s in str(e) for s in _WRITE_FAILURE):
        return True
    try:
        return free_bytes(folder) < 1 << 20
    except OSError:
        return True


def _write_partition(engine: Any, root: Path, tag: str, step: int,
                     state: dict[str, Any]) -> BaseException | None:
    """This rank's files of checkpoint `tag` (DeepSpeed's, its RNG state, rank 0's trainer
    state), fsynced; what failed, if anything.

    Whatever fails, the other ranks must hear of it rather than die on a collective this rank
    never joins: the ranks whose writes went through wait in the barrier that ends DeepSpeed's
    save_checkpoint (its last collective; the writes come after its tag check), so a rank that
    failed inside it joins that barrier before returning."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag_dir = root / tag
    in_deepspeed = True
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        in_deepspeed = False
        torch_save_atomic(rng_state(), tag_dir / f"rng_rank{rank}.pt")
        if rank == 0:
            write_json_atomic(tag_dir / STATE_FILE, {**state, "step": step, "world_size": world,
                                                     "format": FORMAT_VERSION})
        for p in tag_dir.iterdir():
            if p.is_file() and _written_by(p.name, rank):
                fsync_path(p)
    except Exception as e:  # noqa: BLE001 - returned, shared with every rank, then raised
        if in_deepspeed:
            dist.barrier()
        return e
    return None


def _describe_failure(e: BaseException, root: Path) -> str:
    """One line for a failed write, with the free space as the failing rank saw it (one number,
    the same line on every rank)."""
    first = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}; {size_text(free_bytes(root))} free there"


def save(engine: Any, run_dir: str | Path, step: int, state: dict[str, Any], *, keep: int,
         check_free_space: bool = True, log: Callable[[str], None] = print) -> Committed:
    """Save and commit checkpoint `step_<step>`. Collective: every rank must call it.

    Disk space: with `check_free_space`, every rank first checks that its view of the
    checkpoint filesystem has room for one more checkpoint (the previous one's size), and all
    stop with the same one-line error if one has not. A write that fails anyway (a quota, a
    filesystem that reports no free space, another writer filling the disk) is caught on the
    rank it happens to and shared: every rank raises the same `UserError` naming the folder and
    the space, the partial folder is removed (it was never committed), and the newest committed
    checkpoint stays as it was."""
    import torch.distributed as dist

    from bertscale.distributed import gather_problems

    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    t0 = time.monotonic()
    needed = checkpoint_bytes_estimate(run_dir, engine)
    problem = space_problem(root, needed, f"checkpoint step {step}") if check_free_space else None
    problems = gather_problems([problem] if problem else [])
    if problems:
        raise UserError(problems[0] + _newest_committed_note(run_dir))
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of an interrupted save of this same step (never committed): start clean, so
        # no stale partition of another world size sits beside the new files.
        if tag_dir.exists() and _read_marker(tag_dir) is None:
            shutil.rmtree(tag_dir)
        shutil.rmtree(root / f"{tag}_universal", ignore_errors=True)
    dist.barrier()
    error = _write_partition(engine, root, tag, step, state)
    failure = _describe_failure(error, root) if error else None
    problems = gather_problems([failure] if failure else [])
    if problems:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        if error is not None and not is_write_failure(error, root):
            raise error  # not the filesystem: a fault of ours, with its traceback
        raise UserError(f"checkpoint step {step}: writing {tag_dir} failed ({problems[0]}); a "
                        f"checkpoint needs about {size_text(needed)}" + _newest_committed_note(run_dir))
    marker = {"tag": tag, "step": step, "world_size": world, "format": FORMAT_VERSION,
              "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    failure = None
    if rank == 0:
        try:
            fsync_path(tag_dir)
            write_json_atomic(tag_dir / COMMIT_FILE, marker)
            fsync_path(root)
        except OSError as e:
            failure = f"checkpoint step {step}: committing {tag_dir / COMMIT_FILE} failed ({e})"
            (tag_dir / COMMIT_FILE).unlink(missing_ok=True)
    # Also the barrier that keeps every rank (and so the launcher) alive until the commit exists.
    problems = gather_problems([failure] if failure else [])
    if problems:
        raise UserError(problems[0] + _newest_committed_note(run_dir))
    if rank == 0:
        prune(run_dir, keep, log=log)
        log(f"checkpoint step {step} committed at {tag_dir} ({time.monotonic() - t0:.1f}s)")
    return Committed(step, tag_dir, marker)


def _newest_committed_note(run_dir: Path) -> str:
    latest = latest_committed(run_dir)
    return (f". The newest committed checkpoint, step {latest.step} ({latest.path}), is intact"
            if latest else ". No checkpoint of this run is committed yet")


def prune(run_dir: str | Path, keep: int, *, log: Callable[[str], None] = print) -> None:
    """Delete all but the newest `keep` committed checkpoints: marker first (the folder is then
    an ordinary uncommitted one), then the files and any universal copy."""
    if keep < 2:
        raise UserError(f"checkpoint.keep must be at least 2, got {keep}")
    for old in list_committed(run_dir)[:-keep]:
        (old.path / COMMIT_FILE).unlink()
        fsync_path(old.path)
        shutil.rmtree(old.path)
        shutil.rmtree(old.root / f"{old.tag}_universal", ignore_errors=True)
        log(f"checkpoint step {old.step} deleted (keeping the newest {keep})")


# ------------------------------------------------------------------------------ resuming


def check_compatible(state: dict[str, Any], *, tokenizer_hash: str, manifest_fingerprint: str | None,
                     model_config: ModelConfig, where: str) -> None:
    """Refuse to continue a checkpoint with another tokenizer, data set or model shape.
    `manifest_fingerprint=None` skips the data check (phase 2 trains on other shards)."""
    if state.get("tokenizer_hash") != tokenizer_hash:
        raise UserError(f"{where}: was trained with another tokenizer (hash "
                        f"{str(state.get('tokenizer_hash'))[:12]}, now {tokenizer_hash[:12]}); "
                        f"resuming would scramble the embeddings")
    if manifest_fingerprint is not None and state.get("manifest_fingerprint") != manifest_fingerprint:
        raise UserError(f"{where}: was trained on another data manifest ({state.get('manifest_path')}, "
                        f"fingerprint {str(state.get('manifest_fingerprint'))[:12]}, now "
                        f"{manifest_fingerprint[:12]}); the data position would be meaningless. "
                        f"Start a new run folder for new data")
    saved = state.get("model_config") or {}
    now = to_dict(model_config)
    shape = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_act")
    diff = [f"{k} {saved.get(k)} -> {now[k]}" for k in shape if saved.get(k) != now[k]]
    if diff:
        raise UserError(f"{where}: model shape differs from the checkpoint ({'; '.join(diff)})")


def restore_rng(ckpt: Committed, rank: int) -> None:
    """Restore rank `rank`'s RNG states saved with `ckpt` (same world size only)."""
    import torch

    rng_file = ckpt.path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise UserError(f"{rng_file}: missing (checkpoint written by "
                        f"{ckpt.marker.get('world_size')} ranks)")
    set_rng_state(torch.load(rng_file, weights_only=False))


# ------------------------------------------------------------------------------ consolidated


@dataclass
class ConsolidatedModel:
    """Full fp32 weights of a checkpoint, with what is needed to use them."""

    config: ModelConfig
    state_dict: dict[str, Any]
    """BertForPreTraining keys (the tied decoder weight included), fp32 CPU tensors."""
    vocab_path: Path
    lowercase: bool
    step: int


def load_consolidated(path: str | Path) -> ConsolidatedModel:
    """Weights of the newest committed checkpoint of a run folder (or of one checkpoint folder),
    merged from any ZeRO stage on the CPU, without a process group."""
    import torch

    ckpt = resolve(path)
    state = read_state(ckpt)
    config = from_dict(ModelConfig, state["model_config"], f"{ckpt.path / STATE_FILE}: model_config")
    zero_files = list(ckpt.path.glob("*zero_pp_rank_*optim_states.pt"))
    from bertscale.reporting import third_party_output

    # Its "Processing zero checkpoint ..." lines, shown with --verbose, or when the reading
    # fails for another reason than a damaged file.
    with third_party_output():
        try:
            if zero_files:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.root), tag=ckpt.tag)
            else:  # ZeRO-0: the model states file holds the full weights
                model_file = ckpt.path / "mp_rank_00_model_states.pt"
                if not model_file.is_file():
                    raise UserError(f"{ckpt.path}: no DeepSpeed model states file")
                sd = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        except UserError:
            raise
        except Exception as e:
            damaged = _damaged_file(ckpt)
            if damaged is None:
                raise   # every file opens: not a damaged checkpoint but a fault of ours
            raise UserError(f"{damaged[0]}: cannot be read ({damaged[1]}): checkpoint step "
                            f"{ckpt.step} is damaged{_older_committed(ckpt)}") from e
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    # zero_to_fp32 restores tied parameters under every name; add the decoder if it was dropped.
    if "cls.predictions.decoder.weight" not in sd and "bert.embeddings.word_embeddings.weight" in sd:
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    vocab = ckpt.run_dir / VOCAB_FILE
    if not vocab.is_file():
        raise UserError(f"{vocab}: the run folder has lost its vocabulary")
    return ConsolidatedModel(config, sd, vocab, bool(state.get("lowercase", True)), ckpt.step)


def _damaged_file(ckpt: Committed) -> tuple[Path, str] | None:
    """The first of the checkpoint's torch files that does not open (cut short, overwritten),
    with why; None when they all do. Opening maps the file and reads its zip directory only."""
    import torch

    for f in sorted(ckpt.path.glob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure to open is the answer
            first = (str(e).splitlines() or [""])[0][:200]
            return f, f"{type(e).__name__}: {first}"
    return None


def _older_committed(ckpt: Committed) -> str:
    """What to use instead of a damaged checkpoint: an older committed one, if there is one."""
    older = [c for c in list_committed(ckpt.run_dir) if c.step < ckpt.step]
    if not older:
        return " and the run has no older committed checkpoint"
    return f"; pass an older committed one instead, e.g. {older[-1].path}"

