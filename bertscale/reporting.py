"""Progress and metrics that any long job shows and keeps: a progress line with an ETA, and the
metric sinks (metrics.jsonl, Weights & Biases, TensorBoard).

`Progress` draws one pass of known length (training steps, prediction batches, documents): on a
terminal a bar redrawn in place that never exceeds the terminal's width (it is cut to fit, so
it never wraps and scrolls); elsewhere (a log file, a SLURM job) plain lines at a chosen
cadence and one at the end. The ETA counts from the end of the first item, which pays for
warm-up (allocation, compilation, the first data read).

`MetricSinks` writes every record as one JSON line and, when asked, to W&B and TensorBoard. A
sink that fails (no network, no package) warns once and switches itself off: logging never
stops or stalls a job. W&B runs offline without an API key (it writes its folder for a later
`wandb sync`); an online init that fails falls back to offline.

metrics.jsonl is only ever whole lines, one record per step:
- a write that fails (a full disk, a quota) is cut back to the last whole line, said once in a
  warning, and its records are kept in memory (up to `MAX_PENDING`) and written when space
  returns; training goes on. Stopping would not help: the run's checkpoints are what a full
  disk endangers, and the checkpointer checks and refuses those itself (one line, exit 2, the
  previous checkpoint intact), while a disk freed in time loses nothing at all;
- a torn last line left by a killed writer is cut when the file is opened again;
- a resumed run first drops the records after the step it resumes from (`rewind`), so the
  steps it repeats are recorded once.

Limits: the bar assumes one writer on the stream (rank 0's); lines printed by other code while a
bar is open are kept on their own line only if they go through `Progress.note` (or the bar is
closed first). Terminal width is read at every redraw, so a resized window is followed.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TextIO, cast


def hms(seconds: float) -> str:
    """`1:02:03`, `2:03`, or `--:--` when unknown."""
    if not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def use_bar(mode: str, stream: TextIO) -> bool:
    """"bar", "plain", or "auto" (a bar when the stream is a terminal)."""
    if mode not in ("auto", "bar", "plain"):
        raise ValueError(f"progress mode {mode!r}: choose auto, bar or plain")
    if mode == "auto":
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False
    return mode == "bar"


def terminal_width(stream: TextIO, fallback: int = 100) -> int:
    """The width of the terminal `stream` writes to (COLUMNS wins, as for shutil)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size((fallback, 24)).columns


class Progress:
    """One pass of `total` items: `update(done, **values)` after each item, `close()` at the end.

    Plain mode prints a line every `every` items (0: only the closing line)."""

    BAR_MIN, BAR_MAX = 10, 30

    def __init__(self, label: str, total: int, unit: str = "steps", *, mode: str = "auto",
                 every: int = 0, stream: TextIO | None = None, enabled: bool = True):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = enabled and use_bar(mode, self.stream)
        self.every = every
        self.done = 0
        self.t0 = time.monotonic()
        self.t_first: float | None = None
        self.first_done = 0
        self.open = False
        self.values: dict[str, Any] = {}

    def eta(self) -> float:
        if self.t_first is None or self.done <= self.first_done:
            return float("nan")
        rate = (time.monotonic() - self.t_first) / (self.done - self.first_done)
        return rate * (self.total - self.done)

    def _text(self, values: list[tuple[str, Any]]) -> str:
        extra = "  ".join(f"{k} {v}" for k, v in values)
        return (f"{self.done}/{self.total} {self.unit}" + (f"  {extra}" if extra else "")
                + f"  ETA {hms(self.eta())}")

    def render(self, width: int) -> str:
        """The line for a `width`-column terminal, at most width - 1 characters (the last
        column wraps on some terminals). What gives way, in order: the bar, then the values
        from the last (loss stays longest), then the label's start; the counts and the ETA
        always show."""
        room = max(width - 1, 1)
        values = list(self.values.items())
        text = self._text(values)
        n = min(room - len(self.label) - len(text) - 4, self.BAR_MAX)    # "label [bar] text"
        if n >= self.BAR_MIN:
            fill = int(n * self.done / self.total) if self.total else n
            return f"{self.label} [{'#' * fill}{'.' * (n - fill)}] {text}"
        while values and len(self.label) + 1 + len(text) > room:
            values.pop()
            text = self._text(values)
        label = self.label[max(len(self.label) + 1 + len(text) - room, 0):]
        return f"{label} {text}"[:room]

    def update(self, done: int, **values: Any) -> None:
        if not self.enabled:
            return
        self.done = done
        if self.t_first is None:
            self.t_first, self.first_done = time.monotonic(), done
        self.values = {k: _fmt(v) for k, v in values.items()}
        if self.bar:
            self.stream.write("\r" + self.render(terminal_width(self.stream)) + "\x1b[K")
            self.stream.flush()
            self.open = True
        elif self.every and done % self.every == 0 and done < self.total:
            self._line(self._text(list(self.values.items())))

    def note(self, msg: str) -> None:
        """A line of its own, below an open bar (which the next update redraws)."""
        if not self.enabled:
            return
        self._end_bar()
        print(msg, file=self.stream, flush=True)

    def _line(self, msg: str) -> None:
        print(f"{self.label} {msg}", file=self.stream, flush=True)

    def _end_bar(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False

    def close(self, summary: str = "") -> float:
        """End the pass with one line (`label done N steps in 12 s  summary`); returns seconds."""
        seconds = time.monotonic() - self.t0
        if self.enabled:
            if self.bar:
                self.stream.write("\r\x1b[K")
                self.open = False
            self._line(f"{self.done}/{self.total} {self.unit} in {seconds:.1f} s"
                       + (f"  {summary}" if summary else ""))
        return seconds


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4f}"
    return str(v)


class MetricSinks:
    """metrics.jsonl in `folder`, plus W&B and TensorBoard when asked; rank 0 only (`enabled`).

    `wandb_config` is the run's settings as W&B shows them; `name` / `group` name the W&B run
    (a fine-tuning grid puts its runs in one group). The W&B run id is kept in the folder, so a
    resumed run continues the same W&B run."""

    MAX_PENDING = 100_000
    """Records held in memory while metrics.jsonl cannot be written (about 50 MB at most)."""

    def __init__(self, folder: Path, *, enabled: bool = True, wandb: bool = False,
                 tensorboard: bool = False, project: str = "bertscale", name: str | None = None,
                 group: str | None = None, wandb_config: Mapping[str, Any] | None = None,
                 wandb_mode: str = "auto", warn: Any = None):
        self.enabled = enabled
        self.warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
        self.wandb = self.tb = None
        self.fd = -1
        self.pending: list[str] = []
        self.dropped = 0
        self.failing: str | None = None   # why the last write failed, while it does
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._cut_torn_line()
        if wandb:
            self.wandb = init_wandb(folder, project=project, name=name, group=group,
                                    config=dict(wandb_config or {}), mode=wandb_mode,
                                    warn=self.warn)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - e.g. the tensorboard package is missing
                self.warn(f"TensorBoard is unavailable ({type(e).__name__}: {e}); "
                          f"pip install tensorboard")

    def _cut_torn_line(self) -> None:
        """A last line without its newline is a record a killed writer left half-written:
        appending would glue the next record to it. Cut it (truncating needs no free space)."""
        size = os.fstat(self.fd).st_size
        with open(self.path, "rb") as f:
            f.seek(max(size - 65536, 0))
            tail = f.read()
            if size and not tail.endswith(b"\n") and b"\n" not in tail:
                f.seek(0)
                tail = f.read()
        if not size or tail.endswith(b"\n"):
            return
        keep = size - len(tail) + tail.rfind(b"\n") + 1   # 0 when there is no newline at all
        os.ftruncate(self.fd, keep)
        self.warn(f"{self.path}: cut a torn last line ({size - keep} bytes) left by a process "
                  f"stopped while writing it")

    def record(self, kind: str, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.pending.append(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3),
                                        **values}) + "\n")
        if len(self.pending) > self.MAX_PENDING:
            del self.pending[0]
            self.dropped += 1
        self._flush()
        if self.wandb is not None:
            try:
                self.wandb.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)
            except Exception as e:  # noqa: BLE001
                self.warn(f"W&B log failed ({type(e).__name__}: {e}); W&B logging is off")
                self.wandb = None
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def _flush(self) -> bool:
        """Append the pending records as whole lines; on failure, cut the file back to the last
        whole line and keep them for the next try. Whether everything is written."""
        if not self.pending:
            return True
        data = "".join(self.pending).encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass
            if self.failing is None:
                from bertscale.files import free_space, is_disk_full
                why = (f"the disk is full ({free_space(self.path)} free there)" if is_disk_full(e)
                       else f"{type(e).__name__}: {e.strerror or e}")
                self.warn(f"{self.path}: cannot append ({why}); the records are kept in memory "
                          f"and written when it can be written again; training goes on")
                self.failing = why
            return False
        if self.failing is not None:
            self.warn(f"{self.path}: written again ({len(self.pending)} records held while it "
                      f"could not be written)")
            self.failing = None
        self.pending.clear()
        return True

    def rewind(self, step: int) -> None:
        """Drop the records a run resumed from its step-`step` checkpoint will write again: those
        of later steps, and the skipped updates after step `step` (a "skip" record of step s is
        the update after step s, which comes after the checkpoint of step s). `step` -1: a run
        that starts over; nothing is kept. (W&B keeps what it got: it ignores steps logged again
        below its last one.) Lines that do not parse (damage from outside) are dropped too."""
        if not self.enabled:
            return
        self._flush()
        raw = self.path.read_bytes()
        kept, bad = [], 0
        for line in raw.splitlines(keepends=True):
            try:
                r = json.loads(line)
                s = int(r.get("step", 0))
            except (ValueError, TypeError, AttributeError):
                bad += 1
                continue
            if s < step or (s == step and r.get("kind") != "skip"):
                kept.append(line)
        if bad:
            self.warn(f"{self.path}: dropped {bad} line(s) that are not JSON records")
        content = b"".join(kept)
        if raw.startswith(content):  # the usual case: a tail goes, which needs no free space
            os.ftruncate(self.fd, len(content))
            return
        from bertscale.files import DiskFullError, write_bytes_atomic
        try:
            write_bytes_atomic(self.path, content)
        except DiskFullError as e:
            self.warn(f"{e}: the repeated steps will be recorded twice")
            return
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if not self.enabled:
            return
        if not self._flush():
            steps = sorted({json.loads(p)["step"] for p in self.pending})
            self.warn(f"{self.path}: {len(self.pending)} record(s) of steps {steps[0]}-{steps[-1]} "
                      f"could not be written ({self.failing}); they are lost")
        if self.dropped:
            self.warn(f"{self.path}: {self.dropped} older record(s) were dropped while it could "
                      f"not be written")
        os.close(self.fd)
        self.fd = -1
        self.enabled = False
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self.warn(f"W&B finish failed: {e}")
        if self.tb is not None:
            self.tb.close()


def init_wandb(folder: Path, *, project: str, name: str | None, group: str | None,
               config: dict[str, Any], mode: str, warn: Any) -> Any:
    """A W&B run kept in `folder`, resumed across restarts; None (with a warning) on any
    failure. "auto": online when an API key is configured, else offline; WANDB_MODE wins."""
    try:
        import wandb

        chosen = None if "WANDB_MODE" in os.environ else mode
        if chosen == "auto":
            chosen = "online" if os.environ.get("WANDB_API_KEY") or _wandb_logged_in() \
                else "offline"
        id_file = folder / "wandb_id.txt"
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(4))
        run_id = id_file.read_text().strip()
    except Exception as e:  # noqa: BLE001 - W&B must never stop a job
        warn(f"W&B is unavailable ({type(e).__name__}: {e}); W&B logging is off")
        return None
    for attempt in ([chosen, "offline"] if chosen == "online" else [chosen]):
        try:
            # online / offline from the recipe (validated), or None: WANDB_MODE decides.
            run = wandb.init(project=project, name=name, group=group, id=run_id,
                              resume="allow", dir=str(folder),
                              mode=cast("Literal['online', 'offline'] | None", attempt),
                              config=config,
                              settings=wandb.Settings(console="off", init_timeout=90,
                                                      quiet=not VERBOSE))
            if run is not None and getattr(run.settings, "mode", None) == "offline":
                print(f"W&B: offline run in {Path(run.dir).parent} (`wandb sync` it later)",
                      file=sys.stderr, flush=True)
            return run
        except Exception as e:  # noqa: BLE001
            warn(f"W&B init ({attempt or os.environ.get('WANDB_MODE')}) failed: "
                 f"{type(e).__name__}: {e}")
    warn("W&B logging is off for this run")
    return None


def _wandb_logged_in() -> bool:
    """Whether `wandb login` stored a key: an entry for W&B's host in ~/.netrc (or $NETRC), where
    the login writes it. (wandb.api.api_key would tell too, but is deprecated and says so.)"""
    import netrc
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


# ------------------------------------------------------------------ third-party chatter

# Messages of libraries we drive that say nothing a user must act on; they drown our own lines.
# `--verbose` shows them all again.
BENIGN = (
    "untested optimizer",              # ours is a client LAMB/AdamW, correct under ZeRO
    "Setting ds_accelerator to",       # DeepSpeed's accelerator auto-detection; on a GPU
    "Setting accelerator to CPU",      # host that torch cannot see, `bertscale doctor` says so
    "ds_accelerator",
    "torch.distributed.reduce_op",
    "all_gather_into_tensor",
)
VERBOSE = False
"""Set by quiet_third_party; read by `third_party_output`."""


class _DropBenign:
    def filter(self, record: Any) -> bool:
        msg = record.getMessage()
        return not any(b in msg for b in BENIGN)


def quiet_third_party(verbose: bool = False) -> None:
    """Lower what DeepSpeed, transformers and huggingface_hub print to what matters (errors and
    warnings that are not on the BENIGN list); `verbose` keeps everything. Call before the
    libraries are imported (environment variables) or at any time (loggers)."""
    import logging
    import warnings

    global VERBOSE
    VERBOSE = verbose
    # Our own warnings (casing, pooler) read as one line, not file:line plus a source line.
    warnings.formatwarning = lambda message, category, *rest, **kw: (
        f"warning: {message}\n" if issubclass(category, UserWarning)
        else f"{category.__name__}: {message}\n")
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # shard-loading bars
    os.environ.setdefault("DS_ACCELERATOR_LOG_LEVEL", "error")
    os.environ.setdefault("WANDB_SILENT", "true")    # init_wandb says where the run went
    for name in ("DeepSpeed", "deepspeed", "accelerator", "transformers", "torch.distributed"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropBenign) for f in lg.filters):
            lg.addFilter(_DropBenign())
    for b in BENIGN:
        warnings.filterwarnings("ignore", message=f".*{b}.*")
    # DeepSpeed calls torch.distributed functions torch has deprecated (ZeRO-3:
    # reduce_scatter_tensor, four lines a step): torch's advice to its caller, not to our user.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.[\w.]+` is deprecated")


class third_party_output:
    """Swallow what a library call prints to stdout/stderr (e.g. zero_to_fp32's "Processing zero
    checkpoint" lines) unless --verbose; printed after all if the call raises, so nothing that
    explains a failure is lost (but not under a UserError: its one line says what is wrong)."""

    def __enter__(self) -> third_party_output:
        import contextlib
        import io
        self.buffer = io.StringIO()
        self.stack = contextlib.ExitStack()
        if not VERBOSE:
            self.stack.enter_context(contextlib.redirect_stdout(self.buffer))
            self.stack.enter_context(contextlib.redirect_stderr(self.buffer))
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        self.stack.close()
        from bertscale.errors import UserError
        if kind is not None and not issubclass(kind, UserError) and self.buffer.getvalue():
            sys.stderr.write(self.buffer.getvalue())
