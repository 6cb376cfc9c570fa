"""`bertscale demo`: the whole pipeline on any machine, with no data and no network.

1. Corpus: real English prose that ships with every Python installation: the Python Language
   Reference and library topics (`pydoc_data.topics`, the text behind `help()`, ~465 KB) and the
   docstrings of the standard library's own modules (read with `ast`, never imported). Code
   examples, grammar rules and heading underlines are dropped; one document per reference section
   or module. Not synthetic, not downloaded.
2. Tokenizer: a WordPiece vocabulary trained on that corpus (`bertscale.tokenizer.train_wordpiece`).
3. Shards: `bertscale prepare`'s API writes NSP instances at sequence 128 with a held-out split.
4. Pretraining: `bertscale pretrain` with the built-in `demo` recipe (a tiny BERT, DeepSpeed ZeRO-2)
   on N local processes (default 2; this module starts them itself on 127.0.0.1, as torchrun
   would), evaluated before the first step and at the end.
5. A report: MLM accuracy at the start (chance) and at the end, NSP accuracy, the run folder,
   and the next commands (export to a Hugging Face folder, fine-tune on GLUE).

Each demo trains into a new run folder (`run`, then `run-2`, ...): a second demo never deletes
the first. The corpus, vocabulary and shards are reused.

`bertscale demo --shards <manifest> --preset base --steps 2000` runs step 4-5 on your shards with
a bigger model. On a GPU machine the demo trains in bf16 with one process per GPU.

Limits: the corpus is small (~1.3 MB of text), so the numbers show learning, not a useful model;
the first run on a fresh machine includes DeepSpeed's one-off build of its CPU communication op.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bertscale.errors import UserError
from bertscale.files import write_atomic

_UNDERLINE = re.compile(r"^\s*([*=\-~^#\"'`+])\1{2,}\s*$")


# ------------------------------------------------------------------------------ the corpus


def _paragraphs(text: str) -> Iterator[str]:
    """Prose paragraphs of reST-ish documentation: wrapped lines joined, code and grammar dropped."""
    para: list[str] = []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        is_code = (line.startswith("   ") or stripped.startswith((">>>", "...", "::="))
                   or "::=" in stripped)
        if not stripped or is_code or _UNDERLINE.match(line):
            if para:
                joined = " ".join(para)
                # Keep sentences, not headings or fragments: a few words ending in punctuation.
                if len(joined.split()) >= 6 and joined[-1] in ".:;!?)\"'":
                    yield joined
                para = []
            continue
        para.append(stripped)


def reference_documents() -> Iterator[list[str]]:
    """Sections of the Python Language Reference / library topics (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        # A topic holds several sections, each starting with a title over an underline.
        sections = re.split(r"\n(?=[^\n]+\n[*=\-]{3,}\n)", topics[key])
        for section in sections:
            doc = list(_paragraphs(section))
            if doc:
                yield doc


def stdlib_documents() -> Iterator[list[str]]:
    """Docstrings of each standard-library module (tests and installed packages left out), one
    document per module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        doc: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    doc.extend(_paragraphs(text))
        if doc:
            yield doc


def write_corpus(path: Path) -> dict[str, int]:
    """The corpus in BERT's plain-text format: one paragraph per line, blank line between
    documents. Deterministic (sorted inputs)."""
    counts = {"documents": 0, "paragraphs": 0, "characters": 0}

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for source in (reference_documents(), stdlib_documents()):
                for doc in source:
                    f.write("\n".join(doc) + "\n\n")
                    counts["documents"] += 1
                    counts["paragraphs"] += len(doc)
                    counts["characters"] += sum(len(p) for p in doc)
    write_atomic(path, write)
    return counts


# ------------------------------------------------------------------------------ local ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], nproc: int, log_dir: Path, cuda: bool = False) -> int:
    """Run `python argv...` as `nproc` ranks on this machine (loopback), as torchrun would.
    Rank 0 talks to the terminal; the others log to log_dir/rank<R>.log. Returns the first
    non-zero exit code (or 0). Ctrl-C / SIGTERM reach every rank, which then checkpoint."""
    port = str(_free_port())
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    logs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)),
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if not cuda:
            env.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than let DeepSpeed guess
        out = None
        if rank:
            out = open(log_dir / f"rank{rank}.log", "w")
            logs.append(out)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=out,
                                      stderr=subprocess.STDOUT if rank else None))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for f in logs:
            f.close()
    return next((c for c in codes if c), 0)


# ------------------------------------------------------------------------------ the demo


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class DemoConfig:
    """One `bertscale demo`."""

    run_dir: Path = Path("runs/demo")
    """The demo's folder: data, vocabulary, and one run folder per demo (run, run-2, ...)."""
    shards: Path | None = None
    """Train on these shards (a manifest) instead of the corpus of Python's documentation."""
    preset: str | None = None
    """Model preset instead of the demo recipe's."""
    steps: int | None = None
    """Optimizer steps instead of the demo recipe's."""
    nproc: int | None = None
    """Local processes (default: 2 on the CPU, one per GPU)."""
    vocab_size: int = 8000
    """WordPiece vocabulary to train."""
    overrides: list[str] = field(default_factory=list)
    """`--set` overrides of the demo recipe."""


def run_demo(cfg: DemoConfig) -> int:
    """The demo's steps (module docstring); the pretraining's exit code if it failed."""
    import torch

    t0 = time.monotonic()
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    nproc = cfg.nproc or (torch.cuda.device_count() if cuda else 2)
    if cfg.shards:
        manifest = Path(cfg.shards)
        print(f"demo: using your shards {manifest}")
    else:
        manifest = demo_shards(root, cfg.vocab_size, t0)
    overrides = [f"data.manifest={json.dumps(str(manifest))}"]
    if cfg.preset:
        overrides.append(f"model.preset={json.dumps(cfg.preset)}")
    if cfg.steps:
        overrides.append(f"train.steps={cfg.steps}")
    if cuda:
        overrides.append('train.deepspeed="zero2_bf16"')
    overrides += cfg.overrides
    run_dir = new_run_folder(root)
    argv = ["-m", "bertscale", "pretrain", "demo", "--run-dir", str(run_dir)]
    for o in overrides:
        argv += ["--set", o]
    print(f"demo: pretraining on {nproc} local process(es) with DeepSpeed ZeRO-2 "
          f"({'bf16 on GPU' if cuda else 'fp32 on CPU'})")
    t_train = time.monotonic()
    code = launch_local(argv, nproc, root, cuda)
    if code:
        print(f"demo: pretraining stopped with exit code {code} (other ranks' logs: {root}/rank*.log)",
              file=sys.stderr)
        return code
    report(run_dir, root, time.monotonic() - t0, time.monotonic() - t_train)
    return 0


def demo_shards(root: Path, vocab_size: int, t0: float) -> Path:
    """The corpus, a WordPiece vocabulary trained on it and NSP shards at sequence 128, in
    `root` (each reused when there); the shards' manifest."""
    from bertscale.data.prepare import PrepareConfig, run_prepare
    from bertscale.data.shards import read_manifest
    from bertscale.tokenizer import train_wordpiece

    data = root / "data"
    data.mkdir(exist_ok=True)
    corpus = data / "python_docs.txt"
    stats = write_corpus(corpus)
    print(f"demo: corpus {corpus}: {stats['documents']} documents, {stats['paragraphs']} "
          f"paragraphs, {stats['characters'] / 1e6:.2f} MB of English prose from Python's own "
          f"documentation ({time.monotonic() - t0:.0f}s)")
    # Not inside `data`: prepare owns that folder (and copies the vocabulary beside the shards).
    vocab = root / "tokenizer" / "vocab.txt"
    if not vocab.is_file():
        def paragraphs() -> Iterator[str]:
            return (p for p in corpus.read_text(encoding="utf-8").splitlines() if p)
        train_wordpiece(paragraphs, vocab, vocab_size=vocab_size, lowercase=True)
    print(f"demo: WordPiece vocabulary {vocab} ({vocab_size} tokens, {time.monotonic() - t0:.0f}s)")
    manifests = run_prepare(PrepareConfig(
        inputs=[str(corpus)], out=data, vocab=vocab, lowercase=True, seq_lens=[128],
        dupe_factor=3, samples_per_shard=2000, eval_fraction=0.05, seed=12345,
        progress="none"))
    manifest = manifests[128]
    m = read_manifest(manifest)
    print(f"demo: shards {manifest.parent}: {m.num_samples('train')} train / "
          f"{m.num_samples('eval')} eval NSP pairs of up to 128 tokens ({time.monotonic() - t0:.0f}s)")
    return manifest


def report(run_dir: Path, root: Path, seconds: float, train_seconds: float) -> None:
    """What the demo's model learned (held-out MLM and NSP accuracy, first eval against last)
    and the next commands."""
    evals = [r for r in _read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    trains = [r for r in _read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    if len(evals) < 2:
        raise UserError(f"{run_dir / 'metrics.jsonl'}: expected an eval at the start and the end")
    first, last = evals[0], evals[-1]
    vocab_size = json.loads((run_dir / "recipe.json").read_text())["model"]["vocab_size"]
    print("\n" + "=" * 72)
    print(f"bertscale demo: done in {seconds:.0f}s "
          f"(pretraining {train_seconds:.0f}s, {last['step']} steps)")
    print(f"  MLM accuracy (held-out): {first['mlm_acc']:.1%} at step {first['step']} "
          f"(chance {1 / vocab_size:.3%})  ->  {last['mlm_acc']:.1%} at step {last['step']}")
    if "nsp_acc" in last:
        print(f"  NSP accuracy (held-out): {first['nsp_acc']:.1%}  ->  {last['nsp_acc']:.1%} "
              f"(chance 50%; always answering the commoner label: {last['nsp_majority']:.1%})")
    print(f"  loss: {first['loss']:.3f} -> {last['loss']:.3f} held-out"
          + (f"; training loss {trains[0]['loss']:.3f} -> {trains[-1]['loss']:.3f}" if trains else ""))
    print(f"  run folder: {run_dir} (checkpoints/, metrics.jsonl, vocab.txt)")
    print("next:")
    for line in next_commands(run_dir, root):
        print(f"  {line}")
    print("=" * 72)


def new_run_folder(root: Path) -> Path:
    """`root/run`, or `root/run-N` when earlier demos are there: a demo never deletes one."""
    run_dir, n = root / "run", 1
    while run_dir.exists():
        n += 1
        run_dir = root / f"run-{n}"
    if n > 1:
        print(f"demo: earlier demo runs in {root} are kept; this one goes to {run_dir}")
    return run_dir


def next_commands(run_dir: Path, root: Path) -> list[str]:
    """What a user runs next on the demo's model: export it, fine-tune it (GLUE's RTE, which
    docs/quickstart.md says where to get)."""
    run, hf, tuned = (shlex.quote(str(p)) for p in
                      (run_dir, root / "hf" / run_dir.name, root / "finetuned" / run_dir.name))
    return [f"bertscale export --from {run} --to {hf}    # a Hugging Face folder for transformers",
            f"bertscale finetune glue --task RTE --data-dir GLUE/RTE --checkpoint {run} "
            f"--output-dir {tuned}    # GLUE/RTE: see docs/quickstart.md"]
