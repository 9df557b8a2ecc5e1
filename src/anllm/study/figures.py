"""The study's figures: learning curves and recall, one panel per arm, one legend naming every line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .titles import PPL_ORDER, arm_title, method_title

STYLES = {"full": ("k", "-"), "anchor": ("tab:blue", "-"), "sentence": ("tab:gray", ":"),
          "streamingllm": ("tab:orange", "--"), "streamingllm_q": ("tab:red", "--"), "knorm": ("tab:green", "-.")}
OTHER_STYLE = ("tab:red", "-")  # a method without a style of its own


def plot(s: dict[str, Any], out: Path) -> list[str]:
    """One panel per arm: learning curves (PPL vs tokens) and recall (accuracy vs distance)."""
    styles = STYLES

    def curves(ax: Any, arm: str) -> None:
        a = s["arms"][arm]
        for m in PPL_ORDER:
            if m in a["ppl"]:
                color, ls = styles.get(m, OTHER_STYLE)
                ax.plot([t / 1000 for t in a["tokens"]], a["ppl"][m], color=color, linestyle=ls, marker="o", ms=3,
                        label=method_title(m))
        ax.set_yscale("log")

    def recall(ax: Any, arm: str) -> None:
        for m, d in s["recall"][arm].items():
            color, ls = styles.get(m, OTHER_STYLE)
            ax.plot(d["k"], [100 * a for a in d["acc"]], color=color, linestyle=ls, marker="o", ms=3,
                    label=method_title(m))
        ax.axhline(100 / s["num_choices"], color="gray", lw=0.8, ls=":")

    made = []
    for name, arms, draw, xlabel, ylabel in (
        ("learning_curves.png", [a for a, v in s["arms"].items() if v["tokens"]], curves, "tokens trained (thousands)", "held-out perplexity (log)"),
        ("recall.png", list(s["recall"]), recall, "sentences between fact and question (k)", "recall accuracy %"),
    ):
        if arms:
            _panels(out / name, arms, draw, xlabel, ylabel)
            made.append(name)
    return made


def _panels(path: Path, arms: list[str], draw: Any, xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        draw(ax, arm)
        ax.set_title(arm_title(arm))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(ylabel)
    # One legend for the whole figure, every line named (a panel may lack some lines, e.g. the
    # baseline arm has no anchor reading): the union of the panels' labels, in drawing order.
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(handles) <= 4 else 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
