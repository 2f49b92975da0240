"""Pictures of a run for the project folder (PNG, matplotlib without a display): the training curves and the
student / baseline / teacher comparison. Each function returns the files it wrote."""

from __future__ import annotations

from typing import Any

COLORS = {"distilled": "#1f77b4", "baseline": "#ff7f0e", "fine-tuned": "#ff7f0e", "teacher": "#2ca02c"}


def training_curves(path: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Loss, its distillation (KD) and label (CE) parts per logged step, and the held-out KL to the teacher and
    label loss per evaluation, one line per run (`runs`: name -> the records of its metrics.jsonl)."""
    runs = {name: recs for name, recs in runs.items() if recs}
    if not runs:
        return []
    from matplotlib.figure import Figure  # lazy: drawing is the last thing a run does, and a second to import

    panels = [("loss", "training loss"), ("kd", "distillation term (KD)"), ("ce", "label term (CE)"),
              ("eval_kl_to_teacher", "held-out KL(teacher ‖ student)"), ("eval_ce", "held-out label loss")]
    shown = [(k, t) for k, t in panels if any(k in r and r[k] is not None for recs in runs.values() for r in recs)]
    # A Figure of its own, not pyplot's: no display, and no backend of the caller's process is switched.
    fig = Figure(figsize=(4.2 * len(shown), 3.4))
    axes = fig.subplots(1, len(shown), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown, strict=True):
        for name, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if key == "kd" and all(v == 0 for _, v in pts):
                continue  # a run without a teacher has no KD term
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if key.startswith("eval_") else None, markersize=3, label=name,
                        color=COLORS.get(name))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [path]


# What `comparison_chart` draws by default: (key in each model's row, title, format of the value).
TOKEN_METRICS = (("kl_to_teacher", "KL(teacher ‖ model), lower is better", "{:.3f}"),
                 ("top1_agreement", "top-1 agreement with the teacher", "{:.1%}"),
                 ("rouge_l", "ROUGE-L vs the teacher's answers", "{:.3f}"),
                 ("tokens_per_s", "generation tokens/s (this machine)", "{:.0f}"))


def comparison_chart(path: str, result: dict[str, Any], metrics: tuple[tuple[str, str, str], ...] = TOKEN_METRICS,
                     title: str | None = None) -> list[str]:
    """Bars of each of `metrics` for each model of a comparison (compare.py's result), with each value written on
    its bar; `title` (default: the held-out rows and teacher tokens) above them."""
    from matplotlib.figure import Figure  # lazy: drawing is the last thing a run does, and a second to import

    models = [m for m in ("distilled", "baseline", "teacher") if m in result["models"]]
    fig = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, (key, name, fmt) in zip(axes[0], metrics, strict=True):
        values = [float(result["models"][m][key]) for m in models]
        bars = ax.bar(models, values, color=[COLORS[m] for m in models])
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or f"{result['held_out_rows']} held-out rows, {result['held_out_tokens']} teacher tokens",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [path]
