"""The summary and the packed results of benchmarks/gpu_check.sh and gpu_quality.sh.

    python benchmarks/gpu_report.py summary RESULTS              # the tables, from RESULTS/*.json
    python benchmarks/gpu_report.py pack RESULTS PACK --name N --log LOG

`pack` writes, each atomically (a kill mid-pack leaves the previous version): PACK/N_summary.txt
(the summary), PACK/N.log (the log, its last 15 MiB), PACK/N_results.tar.gz (the JSON results,
the step table, each run's recipe and metrics.jsonl, the stages' logs; never shards, weights or
checkpoints).
Three small files per script, in PACK itself: what a machine that returns "at most 8 files of
16 MiB, 2 folders deep" (the one-GPU machine's $OUT) gives back whole.

RESULTS/steps.tsv is the step table the scripts append to: name, status, seconds, limit, note.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

CASES = ("pt_zero1_lamb", "pt_zero2_fp16", "pt_zero3", "pt_2rank_nccl")
PHASES = ("phase1", "phase2", "phase1_real_unpad", "phase2_real_unpad", "phase1_compile")
LOG_TAIL = 15 * 2**20


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "n/a"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps_table(results: Path) -> list[str]:
    rows = [line.split("\t") for line in _read(results / "steps.tsv").splitlines() if line]
    if not rows:
        return []
    out = [f"{'step':20}{'status':12}{'seconds':>8}{'limit':>7}  note"]
    for name, status, seconds, limit, *note in rows:
        out.append(f"{name:20}{status:12}{seconds:>8}{limit:>7}  {' '.join(note)}".rstrip())
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def pretrain_table(results: Path) -> list[str]:
    if not any((results / f"{n}.json").is_file() for n in CASES):
        return []
    out = ["bertscale pretrain (DeepSpeed, BERT-Large shapes, seq 128; medians of the windows "
           "after warm-up; MFU on real tokens against the datasheet peak and the measured "
           "matmul peak)",
           f"{'case':19}{'seq/s':>9}{'TFLOP/s':>9}{'MFU sheet':>11}{'MFU meas':>10}{'skips':>7}"
           f"{'peak GiB':>10}  resume"]
    for name in CASES:
        r = _load(results / f"{name}.json")
        if r is None:
            out.append(f"{name:19}no result (failed, skipped or not reached)")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        drift = (f" (step {r['resumed_at']}, drift {r['resume_drift']:.1%})"
                 if r["resume_drift"] is not None else "")
        seq = f"{r['seq_per_s']:>9.0f}" if r["seq_per_s"] is not None else f"{'n/a':>9}"
        tf = f"{r['tflops']:>9.1f}" if r["tflops"] is not None else f"{'n/a':>9}"
        out.append(f"{name:19}{seq}{tf}{_pct(r['mfu_datasheet']):>11}"
                   f"{_pct(r['mfu_measured']):>10}{r['skipped_updates']:>7}{mem:>10}  "
                   f"{'ok' if not r['problems'] else 'FAILED'}{drift}")
        for problem in r["problems"]:
            out.append(f"{'':19}problem: {problem}")
    return out


def phase_table(results: Path) -> list[str]:
    out: list[str] = []
    first = None
    for name in PHASES:
        r = _load(results / f"{name}.json")
        if r is None:
            out.append(f"{name:19}no result (failed, skipped or not reached)")
            continue
        if first is None:
            first = r
            hf = f"transformers {r['transformers']}" if r["transformers"] else "no transformers"
            out.append(f"{r['device']}, {r['preset']}, torch {r['torch']}, {hf}, "
                       f"{r['precision']}, {r['optimizer']}; matmul peak "
                       f"{r['peak_tflops']:.1f} TFLOP/s")
            out.append(f"{'run':19}{'impl':14}{'seq/s':>9}{'tokens/s':>11}{'TFLOP/s':>9}"
                       f"{'MFU':>7}{'speedup':>9}")
        for impl in ("bertscale", "transformers"):
            x = r["results"].get(impl)
            if x:
                sp = (f"{r['results']['speedup']:.2f}x"
                      if impl == "bertscale" and "speedup" in r["results"] else "")
                out.append(f"{name:19}{impl:14}{x['seq_per_s']:>9.0f}{x['tokens_per_s']:>11.0f}"
                           f"{x['tflops']:>9.1f}{x['mfu']:>7.1%}{sp:>9}")
        if "transformers" not in r["results"]:
            out.append(f"{name:19}{'transformers':14}not measured: {r.get('note') or 'no result'}")
        if r.get("compile_error"):
            out.append(f"{name:19}torch.compile FAILED, bertscale ran eager: {r['compile_error']}")
        elif r["fast_paths"].get("compile"):
            out.append(f"{name:19}compiled ({r.get('compile_backend') or 'inductor'})")
    if first is None:
        return []
    if first.get("datasheet_tflops"):
        out.append(f"MFU above is against the measured matmul peak; the datasheet's is "
                   f"{first['datasheet_tflops']:g} TFLOP/s ({first['datasheet_source']})")
    return ["bertscale vs transformers, one training step (plain PyTorch, autocast)", *out]


def quality_table(results: Path) -> list[str]:
    r = _load(results / "quality.json")
    if r is None:
        return []
    from bertscale.bench.quality import markdown
    return ["quality (bertscale bench quality's table)", *markdown(r).splitlines()]


def summary(results: Path) -> str:
    parts = [steps_table(results), pretrain_table(results), phase_table(results),
             quality_table(results)]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


KEEP = (".json", ".jsonl", ".md", ".tsv", ".png", ".log")
LEAVE = {"checkpoints", "shards", "models", "data", "calibrate"}


def _results_tar(results: Path, name: str) -> bytes:
    """The small result files (JSON, metrics, tables, step table, the stages' logs, a plot), at
    most 4 MiB each; never what lies under a checkpoints, shards, models or data folder (shards,
    vocabularies, weights), nor the main log (packed beside)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(results.rglob("*")):
            rel = p.relative_to(results)
            if (p.is_file() and p.suffix in KEEP and not LEAVE & set(rel.parts[:-1])
                    and str(rel) != f"{name}.log" and p.stat().st_size <= 4 * 2**20):
                tar.add(p, arcname=str(rel))
    return buf.getvalue()


def pack(results: Path, dest: Path, name: str, log: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _write_atomic(dest / f"{name}_summary.txt", summary(results).encode())
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
            _write_atomic(dest / f"{name}.log", f.read())
    except OSError:
        pass
    _write_atomic(dest / f"{name}_results.tar.gz", _results_tar(results, name))


def main(argv: list[str]) -> int:
    if argv[:1] == ["summary"] and len(argv) == 2:
        sys.stdout.write(summary(Path(argv[1])))
        return 0
    if argv[:1] == ["pack"] and len(argv) == 7 and argv[3] == "--name" and argv[5] == "--log":
        pack(Path(argv[1]), Path(argv[2]), argv[4], Path(argv[6]))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
