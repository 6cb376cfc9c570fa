"""The preflight of benchmarks/gpu_check.sh and gpu_quality.sh: every missing piece named at once.

    python benchmarks/gpu_preflight.py [--cuda] [--need MODULE=WHY ...] [--optional MODULE=WHY ...]
                                       [--path PATH=WHY ...]

Prints "preflight: have ...", then one "preflight: optional, missing: ..." or "preflight: MISSING:
..." line per piece; exits 1 when a needed one is missing. Python >= 3.11 is always needed
(bertscale reads recipes with tomllib); --cuda needs a GPU torch can use.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--need", action="append", default=[])
    ap.add_argument("--optional", action="append", default=[])
    ap.add_argument("--path", action="append", default=[])
    args = ap.parse_args(argv)
    missing: list[str] = []
    optional: list[str] = []
    have: list[str] = []
    if sys.version_info < (3, 11):
        missing.append(f"Python >= 3.11 (this is {sys.version.split()[0]}; bertscale reads "
                       f"recipes with tomllib)")
    else:
        have.append(f"Python {sys.version.split()[0]}")
    modules = {}
    for spec, needed in [(s, True) for s in args.need] + [(s, False) for s in args.optional]:
        name, why = spec.split("=", 1)
        try:
            modules[name] = mod = importlib.import_module(name)
            have.append(f"{name} {getattr(mod, '__version__', '')}".strip())
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
            first = str(e).splitlines()[0] if str(e) else ""
            (missing if needed else optional).append(f"{name} ({why}; {type(e).__name__}: {first})")
    for spec in args.path:
        path, why = spec.split("=", 1)
        if not os.path.exists(path):
            missing.append(f"{path} ({why})")
    torch = modules.get("torch")
    if args.cuda and torch is not None:
        if not torch.cuda.is_available():
            build = ("a CPU-only build" if torch.version.cuda is None
                     else f"CUDA {torch.version.cuda}, but no usable GPU")
            missing.append(f"a CUDA GPU usable by torch (torch {torch.__version__} is {build})")
        else:
            have.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} "
                        f"(CUDA {torch.version.cuda})")
    print("preflight: have " + ", ".join(have))
    for m in optional:
        print(f"preflight: optional, missing: {m}")
    for m in missing:
        print(f"preflight: MISSING: {m}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
