"""Figures for the evaluation report (matplotlib, Agg backend, PNG files next to the tables).

* :func:`plot_cache_over_steps`: keys/values held after every forward while generating (full vs anchor);
* :func:`plot_quality_vs_reduction`: accuracy (or BLEU/COMET/...) against C⇓, per task and method,
  from the report rows;
* :func:`plot_ansan_mask`: the AnSAN mask of one example (from :func:`anllm.ansan_mask`), anchor
  tokens labelled.

Each function returns the data it drew, so tests can check a figure shows what it should.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..masks import ansan_mask  # noqa: E402

METHOD_STYLE = {  # line styles differ so that methods holding the same cache stay visible
    "full": dict(color="tab:gray", marker="o", linestyle="-", linewidth=3.0),
    "ansan": dict(color="tab:blue", marker="s", linestyle="--", linewidth=1.5),
    "anchor": dict(color="tab:red", marker="^", linestyle="-", linewidth=1.5),
    "anchor+src": dict(color="tab:orange", marker="v", linestyle=":", linewidth=2.0),
    "streamingllm": dict(color="tab:green", marker="D", linestyle="-.", linewidth=1.5),
}


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cache_over_steps(traces: Mapping[str, Sequence[int]], path: Path, title: str = "KV cache during generation") -> dict[str, list[int]]:
    """One line per method: keys/values held after step t (step 0 = after the prompt)."""
    if not traces:
        raise ValueError("No cache traces to plot.")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    data = {}
    for method, values in traces.items():
        ys = [int(v) for v in values]
        data[method] = ys
        style = METHOD_STYLE.get(method, {})
        ax.plot(range(len(ys)), ys, label=method, color=style.get("color"), linestyle=style.get("linestyle", "-"),
                linewidth=style.get("linewidth", 1.5))
    ax.set_xlabel("generation step (0 = prompt prefilled)")
    ax.set_ylabel("keys/values held (tokens)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    return data


QUALITY_KEYS = ("acc_norm", "acc", "comet", "bleu", "chrf")


def plot_quality_vs_reduction(
    rows: Sequence[Mapping[str, Any]], path: Path, metric: str | None = None
) -> list[tuple[str, str, float, float]]:
    """Scatter of a quality metric against C⇓ (``c_red``), one colour per task, one marker per method.

    ``metric=None`` uses, per row, the first of acc_norm/acc/comet/bleu/chrf it has. Rows without
    ``c_red`` (e.g. external systems) or an error are left out. Returns the plotted points
    ``(task, method, c_red, value)``.
    """
    points: list[tuple[str, str, float, float]] = []
    for row in rows:
        if row.get("error") or row.get("c_red") is None:
            continue
        key = metric if metric is not None else next((k for k in QUALITY_KEYS if row.get(k) is not None), None)
        if key is None or row.get(key) is None:
            continue
        value = float(row[key])
        if key in ("acc", "acc_norm") and value <= 1.0:
            value *= 100.0
        points.append((str(row.get("task")), str(row.get("method")), 100.0 * float(row["c_red"]), value))
    if not points:
        raise ValueError("No rows with both C⇓ (c_red) and a quality metric to plot.")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tasks = sorted({p[0] for p in points})
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(tasks)}
    for task, method, x, y in points:
        style = METHOD_STYLE.get(method.split(":")[0], dict(marker="x"))
        ax.scatter([x], [y], color=colors[task], marker=style["marker"], s=40)
    for task in tasks:  # connect a task's methods so the cost of compression reads as a slope
        pts = sorted((p[2], p[3]) for p in points if p[0] == task)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[task], alpha=0.4, linewidth=1)
    handles = [plt.Line2D([], [], color=colors[t], marker="o", linestyle="", label=t) for t in tasks]
    methods = sorted({p[1] for p in points})
    handles += [
        plt.Line2D([], [], color="black", marker=METHOD_STYLE.get(m.split(":")[0], dict(marker="x"))["marker"], linestyle="", label=m)
        for m in methods
    ]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("C⇓: keys/values cache reduction (%)")
    ax.set_ylabel(metric or "accuracy / quality")
    ax.set_xlim(-5, 105)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return points


def plot_ansan_mask(
    tokens: Sequence[str],
    is_anchor: Sequence[bool] | torch.Tensor,
    path: Path,
    title: str = "AnSAN attention mask",
    *,
    num_sink_tokens: int = 0,
    anchors_see_anchors: bool = False,
) -> torch.Tensor:
    """Draw the AnSAN mask (query rows × key columns) of one sequence; anchor tokens in red.

    Returns the ``[L, L]`` bool mask that was drawn (``anllm.ansan_mask`` of ``is_anchor``).
    """
    anchors = torch.as_tensor(list(is_anchor) if not isinstance(is_anchor, torch.Tensor) else is_anchor, dtype=torch.bool)
    if anchors.dim() != 1 or anchors.numel() != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but is_anchor has shape {tuple(anchors.shape)}.")
    mask = ansan_mask(anchors[None], num_sink_tokens=num_sink_tokens, anchors_see_anchors=anchors_see_anchors)[0]
    L = len(tokens)
    size = min(14.0, max(4.0, 0.16 * L + 1.5))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(mask.numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    labels = [repr(t)[1:-1][:12] for t in tokens]
    ax.set_xticks(range(L))
    ax.set_yticks(range(L))
    fontsize = max(3, min(8, int(400 / max(L, 1))))
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    ax.set_yticklabels(labels, fontsize=fontsize)
    for i, a in enumerate(anchors.tolist()):
        if a:
            ax.get_xticklabels()[i].set_color("red")
            ax.get_yticklabels()[i].set_color("red")
            ax.get_xticklabels()[i].set_fontweight("bold")
            ax.get_yticklabels()[i].set_fontweight("bold")
    ax.set_xlabel("key (anchors in red)")
    ax.set_ylabel("query")
    ax.set_title(title)
    _save(fig, path)
    return mask


def plot_ansan_mask_for_text(model: Any, tokenizer: Any, text: str, path: Path, max_tokens: int = 80) -> torch.Tensor:
    """The AnSAN mask of the first ``max_tokens`` tokens of ``text`` for an anchor-aware model."""
    from ..modeling import get_anchor_config

    cfg = get_anchor_config(model)
    if cfg is None or not cfg.enabled:
        raise ValueError("plot_ansan_mask_for_text needs an anchor-aware model (anchor settings in its config).")
    ids = tokenizer(text)["input_ids"][:max_tokens]
    tokens = [tokenizer.decode([i]) for i in ids]
    is_anchor = [i in set(cfg.anchor_token_ids) for i in ids]
    return plot_ansan_mask(
        tokens,
        is_anchor,
        path,
        title=f"AnSAN mask ({cfg.mode.upper()} anchors in red)",
        num_sink_tokens=cfg.num_sink_tokens,
        anchors_see_anchors=cfg.anchors_see_anchors,
    )
