"""PNG plots for ``--report DIR`` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ttft_cdf(path: Path, series: dict[str, list[float]], title: str, unit: str = "s") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        xs = sorted(values)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set_xlabel(f"time to first token ({unit})")
    ax.set_ylabel("fraction of requests")
    return _finish(plt, fig, ax, path, title)


def budget_fill(path: Path, series: dict[str, list[float]], title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        ax.plot(range(1, len(values) + 1), values, label=label, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("scheduled tokens / budget")
    ax.set_ylim(0, 1.05)
    return _finish(plt, fig, ax, path, title)


def replica_timelines(path: Path, runs: dict[str, list[list[tuple[float, float]]]], title: str) -> Path:
    """runs: policy -> per replica, its (start, end) busy intervals in seconds from the job start."""
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 1.2 + 1.1 * len(runs)), sharex=True,
                             squeeze=False)
    for ax, (policy, replicas) in zip(axes[:, 0], runs.items()):
        for r, intervals in enumerate(replicas):
            ax.broken_barh([(a, b - a) for a, b in intervals], (r - 0.4, 0.8))
        ax.set_yticks(range(len(replicas)), [f"replica {r}" for r in range(len(replicas))])
        ax.set_title(policy, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds from job start")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
