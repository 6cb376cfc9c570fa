"""DeepSpeed's universal checkpoint: continue a run on another number of ranks, ZeRO stage or
precision.

DeepSpeed refuses to load a ZeRO checkpoint at another data-parallel size (its optimizer state is
partitioned by rank). Its answer is the *universal* checkpoint: `ds_to_universal` rewrites the
partitions as one folder per parameter (fp32 master weight, `exp_avg`, `exp_avg_sq`, `step`), which
any world size and any ZeRO stage can load with `{"checkpoint": {"load_universal": true}}`. This
module makes that conversion part of a resume, so nobody runs a converter by hand:

    source = resume_source(committed, world_size)   # converts once if needed (collective)
    ds_config = with_load_universal(ds_config) if source.universal else ds_config
    engine = deepspeed.initialize(..., config=ds_config)
    engine.load_checkpoint(...); repair_universal_load(engine, source)

bertscale.training.deepspeed_engine is the one place that does this (for the resume path,
bertscale.training.checkpoint.resume.restore).

What the trainer must do when it saves (or the converter refuses the checkpoint): give DeepSpeed
`universal_checkpoint_info` as the model's attribute of that name (DeepSpeed copies it into the
model-states file; `deepspeed_engine.mark_universal` does it). DeepSpeed 0.19 refuses it as a
`client_state` key ("reserved checkpoint keys").

The converted folder `<checkpoint_dir>/<tag>_universal/` sits beside its source, is written under a
temporary name and renamed into place with its commit marker inside (bertscale.training.
checkpoint.marker, the same marker and damage policy as a step checkpoint's), and is reused while
the source checkpoint is unchanged. One rank converts; the others wait for its verdict.

Limits (honest):
- The checkpoint folder must be visible to every rank (a shared filesystem): rank 0 converts it.
- Only data parallelism (ZeRO 0-3, no tensor or pipeline parallelism); that is all bertscale uses.
- DeepSpeed's converter carries exactly the optimizer state keys `exp_avg`, `exp_avg_sq` and `step`
  (it was written for Adam). An optimizer with other per-parameter state cannot be converted; we
  refuse it with a clear message instead of silently dropping that state. bertscale's LAMB keeps
  Adam's two moments under those names, so it converts.
- Conversion runs in one process (no worker pool, so it is safe inside a distributed job) and
  needs about the checkpoint's size again on disk. Measured on a busy 2-core CPU machine: BERT-Base
  (110M parameters, ZeRO-2 fp32) 43 s, 2.1 GB written; expect about 3x for BERT-Large. It happens
  once per resized resume; `python -m bertscale.commands.elastic DIR TAG` does it ahead, e.g. in a CPU job.
- Per-rank RNG states cannot be mapped onto a different number of ranks; the trainer reseeds.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from bertscale.errors import UserError
from bertscale.files import human_size, publish_dir
from bertscale.training.checkpoint.layout import (Committed, bytes_on_disk,
                                                  free_bytes, is_write_failure, space_problem,
                                                  universal_path)
from bertscale.training.checkpoint.marker import read_marker, write_marker
from bertscale.training.engine import CheckpointSource

UNIVERSAL_LAYOUT = 2
"""Version of what a converted folder holds (2: loadable by every ZeRO stage, see
`_loadable_by_every_stage`); a copy of another version is converted again."""

# The optimizer state ds_to_universal knows how to carry (deepspeed/checkpoint/ds_to_universal.py
# extract_zero_shards / extract_zero_shards_stage3 hard-code these names).
CONVERTIBLE_STATE_KEYS = frozenset({"exp_avg", "exp_avg_sq", "step"})
REQUIRED_STATE_KEYS = frozenset({"exp_avg", "exp_avg_sq"})

# Peak extra disk space of a conversion, as a multiple of the source checkpoint's size: the
# universal copy (the tied word embeddings are written under both of their names: 2x for a
# tiny BERT, 1.24x for BERT-Large) plus DeepSpeed's temporary per-rank extraction, which lives
# until the merge ends. Measured here: a 53 MB ZeRO-3 checkpoint peaked at 137 MB extra.
CONVERSION_SPACE_FACTOR = 2.6

_ZERO_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


# ------------------------------------------------------------------------------ detection


def needs_conversion(saved_world_size: int, world_size: int) -> bool:
    """A ZeRO checkpoint loads directly only at the data-parallel size it was written with."""
    return int(saved_world_size) != int(world_size)


def with_load_universal(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a DeepSpeed config that loads universal checkpoints."""
    out = dict(ds_config)
    out["checkpoint"] = {**dict(ds_config.get("checkpoint") or {}), "load_universal": True}
    return out


@dataclass
class CheckpointLayout:
    """What a saved DeepSpeed checkpoint folder says about how it was written."""

    world_size: int
    """Data-parallel size at save time (number of ZeRO partitions)."""
    zero_stage: int
    """0 when the optimizer state is not partitioned (no ZeRO files)."""
    optimizer_state_keys: tuple[str, ...]
    """Per-parameter optimizer state names (e.g. exp_avg, exp_avg_sq, step)."""


def inspect_checkpoint(checkpoint_dir: str | Path, tag: str) -> CheckpointLayout:
    """Read the world size, ZeRO stage and optimizer state names of a saved checkpoint, checking
    that every partition file is there. Reads only rank 0's optimizer file (memory-mapped)."""
    folder = Path(checkpoint_dir) / tag
    if not folder.is_dir():
        raise UserError(f"{folder}: checkpoint folder not found")
    optim: dict[int, Path] = {}
    for p in folder.iterdir():
        m = _ZERO_OPTIM_FILE.match(p.name)
        if m:
            optim.setdefault(int(m.group(1)), p)
    model_files = sorted(folder.glob("*model_states.pt"))
    if not model_files:
        raise UserError(f"{folder}: no *model_states.pt file; not a DeepSpeed checkpoint")
    model_state = _load(model_files[0])
    saved_ws = model_state.get("dp_world_size")
    if not optim:
        if saved_ws is None:
            raise UserError(f"{model_files[0]}: has no dp_world_size; not a DeepSpeed checkpoint")
        return CheckpointLayout(int(saved_ws), 0, ())
    world = max(optim) + 1
    missing = [i for i in range(world) if i not in optim]
    if missing:
        raise UserError(f"{folder}: incomplete checkpoint, no optimizer partition for rank(s) "
                        f"{', '.join(map(str, missing))}")
    if saved_ws is not None and int(saved_ws) != world:
        raise UserError(f"{folder}: holds {world} optimizer partitions but says it was written by "
                        f"{saved_ws} ranks; the checkpoint is incomplete or mixed")
    sd = _load(optim[0])["optimizer_state_dict"]
    stage = int(sd.get("zero_stage", 1))
    if stage == 3:
        states = sd["optimizer_state_dict"]["state"]
    else:
        states = sd["base_optimizer_state"]["state"]
    state_keys: set[str] = set()
    for s in (states.values() if isinstance(states, dict) else states):
        state_keys.update(s.keys())
    del model_state, sd
    return CheckpointLayout(world, stage, tuple(sorted(state_keys)))


def _load(path: Path) -> dict[str, Any]:
    import torch
    try:
        loaded: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False,
                                            mmap=True)
        return loaded
    except Exception as e:  # a torn file must name itself, not crash obscurely
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------ conversion


def _source_fingerprint(folder: Path) -> str:
    """Identity of a checkpoint folder's contents: names, sizes and mtimes of its files.
    A re-saved tag (same name, new files) gets a new fingerprint, so a stale conversion is
    never reused."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def is_committed_universal(checkpoint_dir: str | Path, tag: str) -> bool:
    """True when `<tag>_universal` is complete and was made from the current `<tag>`."""
    target = universal_path(checkpoint_dir, tag)
    marker = read_marker(target, remedy="remove that folder to convert the checkpoint again")
    return (marker is not None and marker.get("layout") == UNIVERSAL_LAYOUT
            and marker.get("source_tag") == tag
            and marker.get("source_fingerprint") == _source_fingerprint(Path(checkpoint_dir) / tag))


def convert_to_universal(checkpoint_dir: str | Path, tag: str, *,
                         log: Callable[[str], None] = print, check_free_space: bool = True) -> Path:
    """Convert `<checkpoint_dir>/<tag>` to `<checkpoint_dir>/<tag>_universal` in this process,
    unless a committed conversion of the same source is already there. Not collective.

    `check_free_space` (the recipe's checkpoint.check_free_space) refuses up front when the
    filesystem has less than CONVERSION_SPACE_FACTOR x the checkpoint free; off, the conversion
    is tried, and a write that fails is the same one line (nothing half-written is left)."""
    checkpoint_dir = Path(checkpoint_dir)
    source = checkpoint_dir / tag
    target = universal_path(checkpoint_dir, tag)
    if is_committed_universal(checkpoint_dir, tag):
        return target
    layout = inspect_checkpoint(checkpoint_dir, tag)
    if layout.zero_stage == 0:
        raise UserError(f"{source}: optimizer state is not ZeRO-partitioned; it loads at any world "
                        f"size without conversion")
    keys = set(layout.optimizer_state_keys)
    if not REQUIRED_STATE_KEYS <= keys or not keys <= CONVERTIBLE_STATE_KEYS:
        raise UserError(
            f"{source}: optimizer state keys {sorted(keys)} cannot be converted to a universal "
            f"checkpoint: DeepSpeed's ds_to_universal carries exactly "
            f"{sorted(CONVERTIBLE_STATE_KEYS)}; resume on {layout.world_size} rank(s) instead")
    fingerprint = _source_fingerprint(source)

    # Leftovers of a killed conversion (no marker, temporary name; never loaded) go first:
    # they count against the free space.
    for stale in checkpoint_dir.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    needed = int(CONVERSION_SPACE_FACTOR * bytes_on_disk(source))
    what = (f"converting {source} for a resume on another number of ranks, ZeRO stage or "
            f"precision")
    problem = space_problem(checkpoint_dir, needed, what) if check_free_space else None
    if problem:
        raise UserError(problem)

    if target.exists():
        # Present but not committed from this source: an older conversion of a re-saved tag.
        log(f"elastic: removing stale {target.name} (not made from the current {tag})")
        shutil.rmtree(target)

    work = checkpoint_dir / f".{target.name}.tmp-{os.getpid()}"
    # ds_to_universal writes `latest_universal` into the parent of its output folder: giving it
    # a folder inside our temporary directory keeps that file out of the checkpoint folder.
    out = work / target.name
    work.mkdir(parents=True)
    t0 = time.monotonic()
    log(f"elastic: converting {source} (world size {layout.world_size}, ZeRO-{layout.zero_stage}) "
        f"to a universal checkpoint")
    try:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        args = SimpleNamespace(input_folder=str(source), output_folder=str(out),
                               num_extract_workers=1, num_merge_workers=1,
                               keep_temp_folder=False, strict=True, inject_missing_state=False)
        try:
            _quiet(ds_to_universal, args)
        except AssertionError as e:
            if "universal_checkpoint_info" in str(e):
                raise UserError(
                    f"{source}: has no universal_checkpoint_info in its client state, so DeepSpeed "
                    f"cannot convert it (the trainer sets it on the model before every save: "
                    f"deepspeed_engine.mark_universal)"
                ) from e
            raise
        except Exception as e:
            if not is_write_failure(e, checkpoint_dir):
                raise
            first = (str(e).splitlines() or [""])[0][:200]
            raise UserError(f"{what}: writing the universal copy failed ({type(e).__name__}: "
                            f"{first}); {human_size(free_bytes(checkpoint_dir))} free in "
                            f"{checkpoint_dir}, about {human_size(needed)} are needed. The checkpoint "
                            f"itself is intact; free space there and resume") from None
        (work / "latest_universal").unlink(missing_ok=True)
        _loadable_by_every_stage(out)
        write_marker(out, {
            "tag": target.name,
            "layout": UNIVERSAL_LAYOUT,
            "source_tag": tag,
            "source_fingerprint": fingerprint,
            "source_world_size": layout.world_size,
            "zero_stage": layout.zero_stage,
            "deepspeed_version": _deepspeed_version(),
            "seconds": round(time.monotonic() - t0, 2),
        })
        publish_dir(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"elastic: wrote {target} in {time.monotonic() - t0:.1f}s")
    return target


def _loadable_by_every_stage(folder: Path) -> None:
    """Make a converted folder loadable by every ZeRO stage, not only the one that saved it
    (DeepSpeed 0.19 writes what the source stage's loader reads, and a load into another stage
    failed: an AssertionError in state_dict_factory, a KeyError 'optimizer_state_dict').

    - The model-states file under both names: a ZeRO-1/2 engine reads
      `mp_rank_00_model_states.pt`, a ZeRO-3 engine `zero_pp_rank_0_mp_rank_00_model_states.pt`
      (`_get_all_ckpt_names`). A universal load takes the weights and optimizer state from
      zero/; from this file only the LR schedule, client state and sizes, which every stage
      writes alike.
    - zero/optimizer_state.pt in both layouts: the ZeRO-1/2 loader reads the top-level
      `param_groups` and `ds_version` (and each parameter's step.pt), the ZeRO-3 loader
      `optimizer_state_dict.param_groups` and `optimizer_state_dict.state[0].step`.
    - each parameter's files in the form both loaders read (`_per_parameter_files_for_every_stage`)."""
    import torch

    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    present = [folder / n for n in names if (folder / n).is_file()]
    for name in names:
        if present and not (folder / name).exists():
            try:
                os.link(present[0], folder / name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(present[0], folder / name)
    state_file = folder / "zero" / "optimizer_state.pt"
    sd = torch.load(state_file, map_location="cpu", weights_only=False)
    before = set(sd)
    inner = sd.get("optimizer_state_dict")
    if isinstance(inner, dict):
        sd.setdefault("param_groups", inner["param_groups"])
    else:
        steps = sorted(folder.glob("zero/*/step.pt"))
        if not steps:
            raise UserError(f"{folder}: the universal copy holds no optimizer step count")
        step = torch.load(steps[0], map_location="cpu", weights_only=False)
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}},
                                      "param_groups": sd["param_groups"]}
    # The ZeRO-1/2 loader asserts a DeepSpeed version, which a ZeRO-3 copy lacks.
    sd.setdefault("ds_version", _deepspeed_version())
    if set(sd) != before:
        torch.save(sd, state_file)  # inside the temporary folder, published whole afterwards
    _per_parameter_files_for_every_stage(folder, sd["optimizer_state_dict"]["state"][0]["step"])


def _per_parameter_files_for_every_stage(folder: Path, step: Any) -> None:
    """A copy made from ZeRO-3 holds each parameter's fp32 / exp_avg / exp_avg_sq as a bare
    flat tensor and no step.pt; the ZeRO-1/2 loader wants {"param": tensor of the parameter's
    shape, "cat_dim": 0} and a step.pt ("IndexError: too many indices" otherwise). The ZeRO-3
    loader reads both forms (it flattens), so the copy is rewritten in the ZeRO-1/2 form, with
    the shapes from the model-states file."""
    import torch

    states = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not states.is_file():
        return
    if not torch.is_tensor(step):  # torch's optimizers keep it as a tensor
        step = torch.tensor(float(step))
    shapes: dict[str, Any] = {}
    for group in torch.load(states, map_location="cpu", weights_only=False).get("param_shapes") or []:
        shapes.update(group)
    for param_dir in sorted(p for p in (folder / "zero").iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param_dir / f"{key}.pt"
            if not f.is_file():
                continue
            value = torch.load(f, map_location="cpu", weights_only=False)
            if isinstance(value, dict):
                return  # a ZeRO-1/2 copy: already in that form
            if param_dir.name not in shapes:
                raise UserError(f"{f}: no shape for {param_dir.name} in {states.name}")
            torch.save({"param": value.view(shapes[param_dir.name]), "cat_dim": 0}, f)
        if not (param_dir / "step.pt").exists():
            torch.save(step, param_dir / "step.pt")


def _deepspeed_version() -> str:
    import deepspeed
    return str(deepspeed.__version__)


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """ds_to_universal prints a progress bar per parameter group and a line per step; keep them
    off the job's output, but show them when it fails."""
    import contextlib
    import io
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return fn(*args)
    except BaseException:
        sys.stderr.write(buf.getvalue()[-20000:])
        raise


def ensure_universal(checkpoint_dir: str | Path, tag: str, *, check_free_space: bool = True) -> Path:
    """The universal copy of `<checkpoint_dir>/<tag>`, converting it once if it is not there.

    Collective when torch.distributed is initialised: every rank must call it; rank 0 converts
    and the others wait for its verdict, so a failed conversion raises the same error on every
    rank instead of leaving them in a barrier. Without a process group it simply converts.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return convert_to_universal(checkpoint_dir, tag, check_free_space=check_free_space)
    verdict: list[tuple[str, str] | None] = [None]
    if dist.get_rank() == 0:
        try:
            convert_to_universal(checkpoint_dir, tag, check_free_space=check_free_space)
            verdict[0] = ("ok", "")
        except UserError as e:
            verdict[0] = ("user", str(e))
        except Exception as e:  # re-raised below on every rank, with its type
            verdict[0] = ("bug", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(verdict, src=0)
            raise
    dist.broadcast_object_list(verdict, src=0)
    assert verdict[0] is not None
    kind, message = verdict[0]
    if kind == "user":
        raise UserError(message)
    if kind == "bug":
        raise RuntimeError(f"universal conversion failed on rank 0: {message}")
    if not is_committed_universal(checkpoint_dir, tag):
        # Rank 0 committed it, so this rank does not see the same folder: not a shared filesystem.
        raise UserError(f"{universal_path(checkpoint_dir, tag)}: rank 0 converted it but rank "
                        f"{dist.get_rank()} cannot see it; the checkpoint folder must be on a "
                        f"filesystem shared by all nodes")
    return universal_path(checkpoint_dir, tag)


# ------------------------------------------------------------------------------ resume


def resume_source(ckpt: Committed, world_size: int, *, engine_changed: bool = False,
                  check_free_space: bool = True) -> CheckpointSource:
    """Decide how to load committed checkpoint `ckpt` on `world_size` ranks, converting it to a
    universal checkpoint (once, collectively) when the size changed or, with `engine_changed`,
    when the ZeRO stage or the precision did (DeepSpeed's direct load needs the same partition
    files: another stage fails an assertion, bf16's ZeRO-1 optimizer writes files of another
    name). The saved world size is the commit marker's; the partition files must agree with it.
    Call on every rank after the process group is up and before deepspeed.initialize."""
    layout = inspect_checkpoint(ckpt.root, ckpt.tag)
    if layout.zero_stage and layout.world_size != ckpt.world_size:
        raise UserError(f"{ckpt.path}: holds {layout.world_size} optimizer partitions but its "
                        f"commit marker says {ckpt.world_size} ranks saved it; the checkpoint is "
                        f"incomplete or mixed")
    if layout.zero_stage == 0 or not (engine_changed
                                      or needs_conversion(ckpt.world_size, world_size)):
        return CheckpointSource(ckpt.root, ckpt.tag, False, ckpt.world_size)
    path = ensure_universal(ckpt.root, ckpt.tag, check_free_space=check_free_space)
    return CheckpointSource(ckpt.root, path.name, True, ckpt.world_size)


def repair_universal_load(engine: Any, source: CheckpointSource) -> None:
    """Undo what DeepSpeed 0.19 gets wrong when it loads a universal checkpoint into ZeRO-3.
    Call on every rank right after `engine.load_checkpoint` (no communication); a no-op for
    same-size loads and for ZeRO-1/2, whose loader is right.

    Its ZeRO-3 universal loader (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    has two faults that change training after an elastic resume without any error:
    - it copies the hyperparameters of param group 0 onto EVERY group, so BERT's no-decay group
      (biases, LayerNorm) would get weight decay. The converted folder holds every group's
      values; we put them back.
    - it hands the SAME `step` tensor object to every group's state; torch's Adam/AdamW (and
      bertscale's Lamb) increment it in place once per group, so with two groups the step
      advances twice per optimizer step and the bias correction drifts. We give each group its
      own copy.
    """
    if source.universal and engine.zero_optimization_stage() == 3:
        _restore_param_groups(engine, Path(source.load_dir) / source.tag)


def _restore_param_groups(engine: Any, universal_folder: Path) -> None:
    saved = _load(universal_folder / "zero" / "optimizer_state.pt")
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    live = engine.optimizer.optimizer.param_groups
    if len(groups) != len(live):
        raise UserError(f"{universal_folder}: holds {len(groups)} optimizer param groups but the "
                        f"optimizer has {len(live)}; the model or optimizer setup changed")
    for live_group, saved_group in zip(live, groups):
        for key, value in saved_group.items():
            if key != "params":
                live_group[key] = value
    import torch
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
