"""The report of `bertscale bench quality`: GLUE means and spreads, the targets, the markdown
table and the pretraining curves."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bertscale.bench.quality.runs import MODEL_LABELS, MODELS, log
from bertscale.files import write_atomic


def main_metric(summary: dict[str, Any]) -> dict[str, Any]:
    """A task's main dev metric at its best learning rate: mean, std and the number of seeds."""
    m = summary["metrics"][summary["main_metric"]]
    return dict(metric=summary["main_metric"], mean=m["mean"], std=m["std"],
                n=sum(1 for r in summary["runs"] if r["lr"] == summary["best_lr"]),
                best_lr=summary["best_lr"])


def time_to_reach(curve: list[dict[str, Any]], loss: float) -> float | None:
    """Training seconds of the first held-out point at or below `loss` (None: never)."""
    return next((p["train_s"] for p in curve if p["mlm_loss"] <= loss), None)


def targets(pre: dict[str, dict[str, Any]], glue: dict[str, dict[str, Any]],
            tasks: list[str]) -> dict[str, Any]:
    """The benchmark's three targets (docs/benchmarks.md), each met or missed, with the figures."""
    a, c = pre["bertscale"], pre["transformers"]
    c_final = c["curve"][-1]["mlm_loss"]
    reach = time_to_reach(a["curve"], c_final)
    ratio = reach / c["train_s"] if reach is not None and c["train_s"] else None

    def spread(m: dict[str, Any]) -> float:
        return m["std"] or 0.0

    beats = {}
    for t in tasks:
        ma, mb = glue[t]["bertscale"], glue[t]["random_init"]
        beats[t] = ma["mean"] - mb["mean"] > max(spread(ma), spread(mb))
    avg = {m: statistics.fmean(glue[t][m]["mean"] for t in tasks) for m in MODELS}
    return {
        "a_beats_b_every_task_by_more_than_seed_spread": all(beats.values()),
        "a_beats_b_by_task": beats,
        "transformers_final_mlm_loss": c_final,
        "bertscale_final_mlm_loss": a["curve"][-1]["mlm_loss"],
        "bertscale_seconds_to_transformers_final_loss": reach,
        "time_ratio": ratio,
        "time_ratio_at_most_0.7": ratio is not None and ratio <= 0.7,
        "glue_average": avg,
        "a_better_glue_average_than_c": avg["bertscale"] > avg["transformers"],
    }


def _cell(m: dict[str, Any]) -> str:
    return (f"{100 * m['mean']:.1f}" if m["std"] is None
            else f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}")


def markdown(results: dict[str, Any]) -> str:
    """results.md: the GLUE table, the pretraining table and the targets."""
    tasks, glue, pre, tg = results["tasks"], results["glue"], results["pretraining"], results["targets"]
    lines = [f"Quality at small scale: {results['hardware']['date']}, {results['hardware']['cpu']}, "
             f"{results['hardware']['threads']} threads, torch {results['hardware']['torch']}, "
             f"transformers {results['hardware']['transformers']}.", "",
             "| model | " + " | ".join(f"{t} ({glue[t]['bertscale']['metric']})" for t in tasks)
             + " | average |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for m in MODELS:
        lines.append(f"| {MODEL_LABELS[m]} | " + " | ".join(_cell(glue[t][m]) for t in tasks)
                     + f" | {100 * tg['glue_average'][m]:.1f} |")
    seeds = glue[tasks[0]]["bertscale"]["n"]
    lines += ["", f"Dev metrics x100, mean ± std over {seeds} seed(s).", "",
              "| pretraining | steps | training s | tokens | final held-out MLM loss | MLM acc |",
              "|---|---|---|---|---|---|"]
    for m in ("bertscale", "transformers"):
        p = pre[m]
        lines.append(f"| {m} | {p['steps']} | {p['train_s']:.0f} | {p['tokens']:,} | "
                     f"{p['curve'][-1]['mlm_loss']:.3f} | {p['curve'][-1]['mlm_acc']:.3f} |")
    reach = tg["bertscale_seconds_to_transformers_final_loss"]
    lines += ["", "Targets:",
              f"- (a) beats (b) on every task by more than the seed spread: "
              f"{'met' if tg['a_beats_b_every_task_by_more_than_seed_spread'] else 'MISSED'} "
              f"({', '.join(f'{t}: {v}' for t, v in tg['a_beats_b_by_task'].items())})",
              f"- bertscale reaches transformers' final held-out MLM loss "
              f"({tg['transformers_final_mlm_loss']:.3f}) in <= 0.7x its time: "
              + (f"{'met' if tg['time_ratio_at_most_0.7'] else 'MISSED'} ({reach:.0f} s, "
                 f"{tg['time_ratio']:.2f}x)" if reach is not None else "MISSED (never reached)"),
              f"- better GLUE average than transformers at equal wall-clock: "
              f"{'met' if tg['a_better_glue_average_than_c'] else 'MISSED'}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """The held-out MLM loss against training time and tokens, both sides; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'bertscale[bench]'): plot skipped")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in ("bertscale", "transformers"):
        c = results["pretraining"][m]["curve"]
        axes[0].plot([p["train_s"] / 60 for p in c], [p["mlm_loss"] for p in c], "o-",
                     label=MODEL_LABELS[m])
        axes[1].plot([p["tokens"] / 1e6 for p in c], [p["mlm_loss"] for p in c], "o-",
                     label=MODEL_LABELS[m])
    axes[0].set_xlabel("training wall-clock (min)")
    axes[1].set_xlabel("tokens seen (M)")
    for ax in axes:
        ax.set_ylabel("held-out MLM loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True
