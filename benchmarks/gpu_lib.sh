# What benchmarks/gpu_check.sh and gpu_quality.sh share (sourced, not run): a hard deadline,
# steps run in process groups of their own and killed whole, a step table, and the results packed
# after every step. The sourcing script sets NAME, PY, ROOT, RESULTS, LOG, STEPS_TSV, PACK
# (may be empty), DEADLINE, RESERVE and SCRATCH first, and calls `preflight` and `install_kit`.

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - SECONDS - RESERVE )); }

# The results so far into $PACK (a no-op without it). Before Python is known to work, the log alone.
PACK_READY=0
pack() {
  [ -n "$PACK" ] || return 0
  mkdir -p "$PACK"
  if [ "$PACK_READY" = 1 ] && "$PY" "$ROOT/benchmarks/gpu_report.py" pack "$RESULTS" "$PACK" \
       --name "$NAME" --log "$LOG" >>"$LOG" 2>&1; then return 0; fi
  cp "$LOG" "$PACK/$NAME.log.tmp" && mv "$PACK/$NAME.log.tmp" "$PACK/$NAME.log"
}

# A step's command runs in a process group of its own (a new session), so that a timeout kills
# everything it started (torchrun's workers, pytest's subprocesses), and dies with this script.
LAUNCH='
import ctypes, os, signal, sys
try:
    os.setsid()
except OSError:
    pass  # already a process group leader (a shell with job control): its pid is its group
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the script
except (OSError, AttributeError):
    pass
os.execvp(sys.argv[1], sys.argv[1:])'
STEP_PID=""
kill_group() {  # TERM, 5 s of grace, then KILL, to the whole group
  kill -TERM -- "-$1" 2>/dev/null || return 0
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    sleep 0.5
    kill -0 -- "-$1" 2>/dev/null || return 0
  done
  kill -KILL -- "-$1" 2>/dev/null || true
}
# run_group LIMIT CMD...: the command's output to the log; STEP_RC and TIMED_OUT set.
run_group() {
  local limit="$1"; shift
  "$PY" -c "$LAUNCH" "$@" >>"$LOG" 2>&1 </dev/null &
  STEP_PID=$!
  local end=$(( SECONDS + limit ))
  TIMED_OUT=0
  while kill -0 "$STEP_PID" 2>/dev/null; do
    if [ "$SECONDS" -ge "$end" ]; then TIMED_OUT=1; kill_group "$STEP_PID"; break; fi
    sleep 0.5
  done
  wait "$STEP_PID"; STEP_RC=$?
  kill -KILL -- "-$STEP_PID" 2>/dev/null || true   # what the step left behind, if anything
  STEP_PID=""
}

cleanup() {
  local rc=$?
  if [ -n "$STEP_PID" ]; then kill_group "$STEP_PID"; fi
  pack
  rm -rf "$SCRATCH"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "!! $NAME: stopped by a signal at t=${SECONDS}s"; exit 143' TERM INT HUP

# step NAME WANT NEED CMD...: run with limit min(WANT, time left); skipped when less than NEED
# seconds are left. Never stops the script; records its row in steps.tsv and packs.
FAILED=() LATE=()
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STEPS_TSV"; }
step() {
  local name="$1" want="$2" need="$3"; shift 3
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*)
    say "== $name skipped (GPU_CHECK_SKIP)"; record "$name" skipped 0 - GPU_CHECK_SKIP; return 0 ;; esac
  if [ -n "${GPU_CHECK_ONLY:-}" ]; then
    case " $GPU_CHECK_ONLY " in *" $name "*) ;; *)
      say "== $name skipped (not in GPU_CHECK_ONLY)"; record "$name" skipped 0 - GPU_CHECK_ONLY; return 0 ;; esac
  fi
  local room; room="$(left)"
  need="${GPU_CHECK_NEED_S:-$need}"
  if [ "$room" -lt "$need" ]; then
    say "== $name skipped: ${room}s left before the deadline, it needs ${need}s"
    record "$name" deadline 0 - "${room}s left, needs ${need}s"; LATE+=("$name"); pack; return 0
  fi
  want=$(( want * ${GPU_CHECK_LIMIT_SCALE:-1} ))
  local limit=$(( want < room ? want : room )) t0=$SECONDS
  say "== $name (limit ${limit}s, t=${SECONDS}s)"
  run_group "$limit" "$@"
  local took=$(( SECONDS - t0 )) last
  last="$(tail -n 10 "$LOG" | sed 's/^/   | /')"
  if [ "$TIMED_OUT" = 1 ]; then
    say "!! $name: timed out after ${limit}s (killed with every process it started)"
    echo "$last"
    FAILED+=("$name"); record "$name" timeout "$took" "$limit" ""
  elif [ "$STEP_RC" -ne 0 ]; then
    say "!! $name: failed (exit $STEP_RC)"
    echo "$last"
    FAILED+=("$name"); record "$name" failed "$took" "$limit" "exit $STEP_RC"
  else
    say "   $name: ok (${took}s)"; record "$name" ok "$took" "$limit" ""
  fi
  pack
}

# The kit's wheels of the distributions this interpreter lacks (what it has, it keeps); the
# folder goes on PYTHONPATH for every later step.
KIT='
import importlib.metadata as md, subprocess, sys
wheels, site = sys.argv[2:], sys.argv[1]
def present(whl):
    name = whl.rsplit("/", 1)[-1].split("-")[0]
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False
todo = [w for w in wheels if not present(w)]
have = sorted(w.rsplit("/", 1)[-1] for w in wheels if w not in todo)
print("wheels: already installed here, kept: " + (", ".join(have) or "none"))
if todo:
    print("wheels: installing " + ", ".join(w.rsplit("/", 1)[-1] for w in todo))
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                              "--no-deps", "--no-compile", "--target", site, *todo]))'
install_kit() {  # WHEELS_DIR
  if compgen -G "$1/*.whl" >/dev/null; then
    step wheels 120 10 "$PY" -c "$KIT" "$SCRATCH/site" "$1"/*.whl
    export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
  else
    say "== wheels: none in $1 (\`make gpu-kit\` builds them; needed where DeepSpeed is missing)"
  fi
}

# preflight ARGS...: benchmarks/gpu_preflight.py ARGS, its lines to the terminal too; exit 1
# when it names a missing piece.
preflight() {
  say ""
  say "== preflight (t=${SECONDS}s)"
  local before; before="$(wc -l < "$LOG")"
  run_group 90 "$PY" "$ROOT/benchmarks/gpu_preflight.py" "$@"
  tail -n +"$((before + 1))" "$LOG" | grep '^preflight:'
  if [ "$STEP_RC" -ne 0 ]; then
    say "$NAME: preflight found missing pieces (above); nothing measured"
    record preflight failed "$SECONDS" 90 "missing pieces"
    exit 1
  fi
  record preflight ok "$SECONDS" 90 ""
  PACK_READY=1
  pack
}
