"""Tables and plots from evaluation rows."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

NEAR_ZERO = 0.2  # a task kind the full cache scores below this is flagged, not averaged in


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt_keep(keep) -> str:
    return keep if isinstance(keep, str) else f"{keep:g}"


def _keep_order(keep) -> float:
    return -keep if isinstance(keep, (int, float)) else 1.0  # descending keeps, then "auto"


def summarize(rows: list[dict]) -> dict:
    """Per (method, keep): mean accuracy over reliable task kinds, per-kind accuracy, KLs, bytes, times."""
    full_by_kind = defaultdict(list)
    for r in rows:
        if r["method"] == "full":
            full_by_kind[r["kind"]].append(r["score"])
    full_acc = {k: _mean(v) for k, v in full_by_kind.items()}
    flagged = sorted(k for k, v in full_acc.items() if v < NEAR_ZERO)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["keep"])].append(r)
    table = []
    for (method, keep), rs in sorted(groups.items(), key=lambda x: (x[0][0] != "full", x[0][0], _keep_order(x[0][1]))):
        kinds = sorted({r["kind"] for r in rs})
        per_kind = {k: _mean(r["score"] for r in rs if r["kind"] == k) for k in kinds}
        table.append({
            "method": method, "keep": keep, "n": len(rs),
            "keep_achieved": _mean(r["keep_achieved"] for r in rs),
            "accuracy": _mean(r["score"] for r in rs if r["kind"] not in flagged),
            "needle_accuracy": _mean(r["score"] for r in rs if r["kind"].startswith("niah") and r["kind"] not in flagged),
            "per_kind": per_kind,
            "kl_qa": _mean(r["kl_qa"] for r in rs),
            "kl_cont": _mean(r["kl_cont"] for r in rs),
            "bytes_per_token": _mean(r["bytes_per_token"] for r in rs),
            "build_s_per_1k": _mean(r["build_s_per_1k"] for r in rs),
            "ttft_s": _mean(r["ttft_s"] for r in rs),
        })
    calibrated = defaultdict(list)
    for r in rows:
        if r["keep"] == "auto":
            calibrated[r["method"]].append(r["keep_achieved"])
    return {"full_accuracy_by_kind": full_acc, "flagged_kinds": flagged, "table": table,
            "calibrated_keeps": dict(calibrated)}


def markdown(summary: dict) -> str:
    lines = ["| method | keep | accuracy | needle acc. | KL q+a | KL cont. | bytes/token | build s/1k tok | TTFT ms | n |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in summary["table"]:
        lines.append(f"| {t['method']} | {_fmt_keep(t['keep'])} | {t['accuracy']:.3f} | {t['needle_accuracy']:.3f} | "
                     f"{t['kl_qa']:.4f} | {t['kl_cont']:.4f} | {t['bytes_per_token']:.0f} | "
                     f"{t['build_s_per_1k']:.2f} | {1000 * t['ttft_s']:.0f} | {t['n']} |")
    kinds = sorted(summary["full_accuracy_by_kind"])
    lines += ["", "Accuracy per task kind (full cache first; flagged kinds are left out of the averages above):", "",
              "| method | keep | " + " | ".join(kinds) + " |", "| --- | ---: |" + " ---: |" * len(kinds)]
    for t in summary["table"]:
        lines.append(f"| {t['method']} | {_fmt_keep(t['keep'])} | " +
                     " | ".join(f"{t['per_kind'].get(k, float('nan')):.2f}" for k in kinds) + " |")
    if summary["flagged_kinds"]:
        lines += ["", f"Flagged (full cache below {NEAR_ZERO:.0%} on the model): {', '.join(summary['flagged_kinds'])}."]
    return "\n".join(lines) + "\n"


def plots(summary: dict, out: Path, budgets: dict | None = None) -> list[str]:
    """quality_vs_keep.png, and budgets_<method>.png heat maps of kept entries per (layer, head)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_method = defaultdict(list)
    for t in summary["table"]:
        if t["method"] != "full":
            by_method[t["method"]].append(t)
    full = next((t for t in summary["table"] if t["method"] == "full"), None)
    for method, ts in sorted(by_method.items()):
        auto = [t for t in ts if t["keep"] == "auto"]
        ts = sorted((t for t in ts if t["keep"] != "auto"), key=lambda t: t["keep"])
        line = axes[0].plot([t["keep"] for t in ts], [t["accuracy"] for t in ts], marker="o", label=method)
        axes[1].plot([t["keep"] for t in ts], [max(t["kl_qa"], 1e-6) for t in ts], marker="o", label=method)
        for t in auto:  # calibrated: plotted at its mean achieved keep
            color = line[0].get_color() if line else None
            axes[0].plot([t["keep_achieved"]], [t["accuracy"]], marker="*", markersize=12, color=color,
                         linestyle="none", label=f"{method} auto")
            axes[1].plot([t["keep_achieved"]], [max(t["kl_qa"], 1e-6)], marker="*", markersize=12, color=color,
                         linestyle="none")
    if full is not None:
        axes[0].axhline(full["accuracy"], color="black", linestyle="--", label="full cache")
    axes[0].set(xlabel="keep", ylabel="accuracy", title="task accuracy vs keep")
    axes[1].set(xlabel="keep", ylabel="KL(full || compressed), question + answer", yscale="log",
                title="fidelity vs keep")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "quality_vs_keep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(str(path))
    if summary.get("calibrated_keeps"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, keeps in sorted(summary["calibrated_keeps"].items()):
            ax.hist(keeps, bins=[i / 20 for i in range(21)], alpha=0.6, label=method)
        ax.set(xlabel="calibrated keep", ylabel="documents", title="keeps chosen by --keep auto")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "calibrated_keeps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))
    for name, grid in (budgets or {}).items():
        fig, ax = plt.subplots(figsize=(4, 6))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(xlabel="KV head", ylabel="layer", title=f"kept entries per head\n{name}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        safe = name.replace(":", "_").replace(" ", "_").replace("/", "_")
        path = out / f"budgets_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(str(path))
    return made


_SPLIT_ROLE = {"tuning": "defaults are chosen here", "validation": "trained models are chosen here"}


def by_split(rows: list[dict]) -> dict:
    """{split: {source: summary}}: a table per text source, under its split (tuning / heldout / validation),
    plus ``all`` per split; empty when every row comes from one source (the report's main table says it all)."""
    sources = sorted({r.get("source", "python-reference") for r in rows})
    if len(sources) < 2:
        return {}
    out: dict = {}
    for split in sorted({r.get("split", "tuning") for r in rows}):
        part = [r for r in rows if r.get("split", "tuning") == split]
        out[split] = {"all": summarize(part)} | {
            src: summarize([r for r in part if r.get("source") == src])
            for src in sorted({r.get("source") for r in part})}
    return out


def split_markdown(splits: dict) -> str:
    lines = []
    for split, per_source in splits.items():
        names = [s for s in per_source if s != "all"]
        lines += ["", f"## {split} split ({_SPLIT_ROLE.get(split, 'report these')}): "
                  f"{', '.join(names)}", "", markdown(per_source["all"]).split("\n\n")[0]]
        for src in names:
            lines += ["", f"### {split}: {src}", "", markdown(per_source[src]).split("\n\n")[0]]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out: Path, budgets: dict | None = None, model: dict | None = None) -> dict:
    """summary.json and report.md (headed by the model the rows are of, where given), and the plots."""
    summary = summarize(rows)
    splits = by_split(rows)
    if splits:
        summary["splits"] = splits
    head = ""
    if model is not None:
        summary["model"] = model
        head = f"Model: {model['name']} (`{model['source']}`, weights sha256 {model['weights_sha256'][:12]})\n\n"
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(head + markdown(summary) + (split_markdown(splits) if splits else ""))
    summary["plots"] = plots(summary, out, budgets)
    return summary
