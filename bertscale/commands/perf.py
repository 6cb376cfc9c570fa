"""`python -m bertscale.commands.perf [--device cuda] [--dtype bf16]`: the matmul peak of a device
and dtype, measured (the denominator of the benchmarks' MFU)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    import torch

    from bertscale.perf import measure_matmul_peak

    p = argparse.ArgumentParser(prog="python -m bertscale.commands.perf",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--n", type=int, default=None)
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # Best of two medians: a busy device only ever lowers the figure.
    peak = max(measure_matmul_peak(a.device, dtype, a.n) for _ in range(2))
    name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    print(f"matmul peak on {a.device} ({name}) {a.dtype}: {peak / 1e12:.3f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
