"""`python -m train.report SWEEP_OR_RUN_DIRS... out=REPORT_DIR`: compare runs offline, from their run directories.

The Hydra spelling is `runs=[DIR1,DIR2] out=REPORT_DIR` (configs/report.yaml, schema `ReportRoot`).

Writes REPORT_DIR/report.md (a table per run: the settings that differ, final and best validation loss, per-source
validation loss, validation bits per byte overall and per source, tokens seen, tokens/s, MFU, peak memory, wall time,
downstream scores), loss curves of all runs overlaid by step and by tokens (loss_by_step.png, loss_by_tokens.png),
and a note when runs are not comparable (different data, tokenizer or token budget). Runs whose tokenizers differ are
ranked by final validation bits per byte (`val_bpb`), which compares across tokenizers where nats per token do not;
the report says so. Failed sweep jobs are listed with their error.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import yaml

from data_pipeline.cli import hydra_quote, to_object_strict, user_errors
from train.config import ReportRoot
from train.tools import CONFIGS

IGNORED_PREFIXES = ("run.", "logging.", "checkpoint.", "tokenizer.path", "data.path", "train.eval_")
# Config sections shown as one column named after the section, whose cell is the key given here (the data config's
# name), instead of one column per differing key: two data configs differ in dozens of data.sources.* keys.
GROUPED_SECTIONS = {"data": "data.name"}


@dataclass
class Run:
    """One run directory: its resolved config (flattened) and its metrics."""

    path: Path
    config: dict
    rows: list[dict]
    downstream: dict = field(default_factory=dict)

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if "loss" in r]

    @property
    def val_rows(self) -> list[dict]:
        return [r for r in self.rows if r.get("val_loss") is not None]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows by step (evaluation-only rows first); a step logged twice (after a resume) keeps its
    last line."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dedup = {(r["step"], "loss" in r): r for r in rows}
    return sorted(dedup.values(), key=lambda r: (r["step"], "loss" in r))


def find_runs(paths: list[str]) -> tuple[list[Run], list[dict]]:
    """Run directories under the given paths (a run, or a sweep holding runs), and failed sweep jobs."""
    runs, failed = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: pass run or sweep directories")
        for metrics in sorted([p / "metrics.jsonl"] if (p / "metrics.jsonl").is_file() else p.rglob("metrics.jsonl")):
            d = metrics.parent
            if (d / "config.yaml").is_file():
                lm = d / "lm_eval.json"
                runs.append(
                    Run(
                        d,
                        flatten(yaml.safe_load((d / "config.yaml").read_text())),
                        read_metrics(d),
                        json.loads(lm.read_text()) if lm.is_file() else {},
                    )
                )
        for summary in [p / "sweep_summary.jsonl"] if (p / "sweep_summary.jsonl").is_file() else []:
            failed += [r for r in map(json.loads, summary.read_text().splitlines()) if r["status"] != "ok"]
    if not runs:
        raise FileNotFoundError(f"no run directories (config.yaml + metrics.jsonl) under {paths}")
    return runs, failed


def differing(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between runs (what the ablation varied)."""
    keys = sorted({k for r in runs for k in r.config if not k.startswith(IGNORED_PREFIXES)})
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def columns(runs: list[Run]) -> list[str]:
    """The table's setting columns: the differing keys, those of a GROUPED_SECTIONS section as one column."""
    out: list[str] = []
    for key in differing(runs):
        col = key.split(".", 1)[0] if key.split(".", 1)[0] in GROUPED_SECTIONS else key
        if col not in out:
            out.append(col)
    return out


def column_values(runs: list[Run], col: str) -> list[str]:
    """Each run's value in column `col`; a grouped section shows its name, plus a short hash of the section where
    runs share the name but not the settings."""
    if col not in GROUPED_SECTIONS:
        return [_fmt(r.config.get(col)) for r in runs]
    names = [str(r.config.get(GROUPED_SECTIONS[col])) for r in runs]
    digests = []
    for r in runs:
        section = {k: v for k, v in r.config.items() if k.startswith(col + ".") and not k.startswith(IGNORED_PREFIXES)}
        digests.append(hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:6])
    ambiguous = {n for n in names if len({d for m, d in zip(names, digests, strict=True) if m == n}) > 1}
    return [f"{n} #{d}" if n in ambiguous else n for n, d in zip(names, digests, strict=True)]


def md_cell(value) -> str:
    """`value` as one Markdown table cell: a pipe would end the cell and a newline the row; `<` would open HTML
    (a redacted `<redacted>` would vanish)."""
    text = value if isinstance(value, str) else _fmt(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _identity(run: Run) -> dict:
    """What must match for runs to be comparable: data, tokenizer, token budget."""
    out = {"token budget": run.config.get("train.max_steps", 0) * run.config.get("train.global_batch_tokens", 0)}
    for key, name in (("data.path", "data"), ("tokenizer.path", "tokenizer")):
        path = Path(str(run.config.get(key)))
        target = path / ("manifest.json" if name == "data" else "tokenizer.model")
        out[name] = hashlib.sha256(target.read_bytes()).hexdigest()[:12] if target.is_file() else str(path)
    return out


def tokenizers_differ(runs: list[Run]) -> bool:
    return len({_identity(r)["tokenizer"] for r in runs}) > 1


def comparability_notes(runs: list[Run]) -> list[str]:
    ids = [_identity(r) for r in runs]
    notes = []
    for what in ("data", "tokenizer", "token budget"):
        values = {i[what] for i in ids}
        if len(values) > 1:
            if what == "tokenizer":
                notes.append(
                    f"Runs use different tokenizers ({', '.join(map(str, sorted(values)))}): their losses in nats per "
                    "token are not comparable; they are ranked by final validation bits per byte (val_bpb), which is."
                )
            else:
                notes.append(f"Runs are not comparable: they differ in {what} ({', '.join(map(str, sorted(values)))}).")
    return notes


def summarize(run: Run) -> dict:
    train, val = run.train_rows, run.val_rows
    rates = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    mfus = [r["mfu"] for r in train[1:] if r.get("mfu") is not None] or [
        r["mfu"] for r in train if r.get("mfu") is not None
    ]
    last = val[-1] if val else {}
    per_source = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")}
    bpb_source = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_bpb/")}
    bpbs = [r["val_bpb"] for r in val if r.get("val_bpb") is not None]
    return {
        "final_val": val[-1]["val_loss"] if val else None,
        "best_val": min(r["val_loss"] for r in val) if val else None,
        "final_bpb": last.get("val_bpb"),
        "best_bpb": min(bpbs) if bpbs else None,
        "per_source": per_source,
        "per_source_bpb": bpb_source,
        "tokens": train[-1]["tokens"] if train else 0,
        "tokens_per_s": sum(rates) / len(rates) if rates else None,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "peak_mem_gb": max((r.get("peak_mem_gb", 0) for r in train), default=None),
        "wall_s": max((r["elapsed_s"] for r in run.rows if "elapsed_s" in r), default=None),
    }


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def labels(runs: list[Run], cols: list[str]) -> list[str]:
    """Legend entries: each run's values of the setting columns (its directory name when none differ)."""
    values = [column_values(runs, c) for c in cols]
    return [
        ", ".join(f"{c}={v[i]}" for c, v in zip(cols, values, strict=True)) or r.path.name for i, r in enumerate(runs)
    ]


def plot(runs: list[Run], cols: list[str], out: Path) -> list[str]:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["\n".join(textwrap.wrap(lab, 70)) or lab for lab in labels(runs, cols)]
    files = []
    for xkey, name in (("step", "loss_by_step.png"), ("tokens", "loss_by_tokens.png")):
        fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            t = run.train_rows
            ax_t.plot([r[xkey] for r in t], [r["loss"] for r in t], color=color, lw=1.2, label=names[i])
            v = run.val_rows
            ax_v.plot([r[xkey] for r in v], [r["val_loss"] for r in v], "o-", color=color, lw=1.5, ms=4)
        for ax, title in ((ax_t, "training loss"), (ax_v, "validation loss")):
            ax.set_title(title)
            ax.set_xlabel("optimizer step" if xkey == "step" else "tokens seen")
            ax.set_ylabel("cross-entropy (nats/token)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(2, len(runs)), fontsize=9, frameon=False)
        fig.savefig(out / name, bbox_inches="tight")  # the canvas grows to hold the legend below the axes
        plt.close(fig)
        files.append(name)
    return files


def table_lines(runs: list[Run], sums: list[dict]) -> list[str]:
    """The comparison table (Markdown): one row per run, the differing settings first."""
    cols = columns(runs)
    sources = sorted({s for x in sums for s in x["per_source"]})
    bpb_sources = sorted({s for x in sums for s in x["per_source_bpb"]})
    tasks = sorted({t for r in runs for t in r.downstream})
    head = ["run", *cols, "final val", "best val", *[f"val {s}" for s in sources], "final val bpb", "best val bpb"]
    head += [*[f"bpb {s}" for s in bpb_sources], *tasks]
    head += ["tokens", "tokens/s", "MFU", "peak GB", "wall s"]
    values = [column_values(runs, c) for c in cols]
    lines = ["| " + " | ".join(map(md_cell, head)) + " |", "|" + "---|" * len(head)]
    for i, (run, s) in enumerate(zip(runs, sums, strict=True)):
        cells = [run.path.name, *[v[i] for v in values], _fmt(s["final_val"]), _fmt(s["best_val"])]
        cells += [_fmt(s["per_source"].get(src)) for src in sources]
        cells += [_fmt(s["final_bpb"]), _fmt(s["best_bpb"])]
        cells += [_fmt(s["per_source_bpb"].get(src)) for src in bpb_sources]
        cells += [_fmt(run.downstream.get(t, {}).get("score")) for t in tasks]
        cells += [_fmt(s["tokens"]), _fmt(s["tokens_per_s"]), _fmt(s["mfu"], 3), _fmt(s["peak_mem_gb"], 3)]
        cells += [_fmt(s["wall_s"])]
        lines.append("| " + " | ".join(map(md_cell, cells)) + " |")
    return lines


def data_lines(runs: list[Run]) -> list[str]:
    """Each data config of the runs (when they differ): its sources with weight and license."""
    if "data" not in columns(runs):
        return []
    lines, seen = ["", "## Data configs", ""], set()
    for run, name in zip(runs, column_values(runs, "data"), strict=True):
        if name in seen:
            continue
        seen.add(name)
        srcs = sorted({k.split(".")[2] for k in run.config if k.startswith("data.sources.") and k.count(".") >= 3})
        parts = [f"{s} (weight {run.config.get(f'data.sources.{s}.weight')}, "
                 f"{run.config.get(f'data.sources.{s}.license')})" for s in srcs]  # fmt: skip
        lines.append(f"- {name}: {', '.join(parts) or 'no sources'}")
    return lines


def write_report(paths: list[str], out: str | Path) -> Path:
    runs, failed = find_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sums = [summarize(r) for r in runs]
    if tokenizers_differ(runs):  # nats per token do not compare across tokenizers; bits per byte do
        order = sorted(range(len(runs)), key=lambda i: (sums[i]["final_bpb"] is None, sums[i]["final_bpb"] or 0.0))
        runs, sums = [runs[i] for i in order], [sums[i] for i in order]
    lines = ["# Run comparison", "", f"{len(runs)} runs: {', '.join(str(r.path) for r in runs)}", ""]
    lines += [f"> {n}" for n in comparability_notes(runs)] + [""]
    lines += table_lines(runs, sums)
    lines += data_lines(runs)
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- job {r['job']} ({' '.join(r['overrides'])}): {r['error']}" for r in failed]
    lines += ["", "## Loss curves", ""]
    lines += [f"![{f}]({f})" for f in plot(runs, columns(runs), out)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


USAGE = "usage: python -m train.report SWEEP_OR_RUN_DIRS... out=REPORT_DIR  (or runs=[DIR,...] out=REPORT_DIR)"


def hydra_args(args: list[str]) -> list[str]:
    """The documented `DIR... out=REPORT_DIR` as Hydra overrides (`runs=[DIR,...]`); other arguments pass through."""
    dirs = [a for a in args if not a.startswith("-") and "=" not in a]
    rest = [a for a in args if a not in dirs]
    return rest + ([f"runs=[{','.join(map(hydra_quote, dirs))}]"] if dirs else [])


@hydra.main(config_path=CONFIGS, config_name="report", version_base="1.3")
def run_cli(cfg) -> None:
    with user_errors():
        root: ReportRoot = to_object_strict(cfg)
        if not root.out or not root.runs:
            raise ValueError(USAGE)
        print(write_report(root.runs, root.out))


def main() -> None:
    sys.argv[1:] = hydra_args(sys.argv[1:])
    run_cli()


if __name__ == "__main__":
    main()
