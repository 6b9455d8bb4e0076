"""`python -m data_pipeline.bom PATH [--json]`: what a prepared directory, a run or a checkpoint was trained on.

PATH may be a prepared data directory or its manifest.json, a checkpoint tag directory (its bom.json), or a run
directory (the latest checkpoint's bom.json, else the run's bom.json). Prints one line per source (license, docs,
tokens, attribution) and, with --json, the summary as JSON. The Hydra spelling is `path=PATH json=true`
(configs/bom.yaml, schema `BomRoot`); `--help` prints the usage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra

from data_pipeline.cli import hydra_quote, to_object_strict, user_errors
from data_pipeline.config import BomRoot
from data_pipeline.shards import MANIFEST

USAGE = "usage: python -m data_pipeline.bom PATH [--json]  (or path=PATH json=true; PATH: data, run or checkpoint dir)"


def find_bom(path: str | Path) -> Path:
    """The bill-of-materials file for PATH (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return path
    # bom.json first: a checkpoint tag directory also holds a manifest.json, of its files, not of the data.
    candidates = [path / "bom.json", path / MANIFEST]
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        candidates.insert(0, path / "checkpoints" / latest.read_text().strip() / "bom.json")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no bill of materials at {str(path)!r}: expected a prepared data directory (manifest.json), a run "
        "directory or a checkpoint tag directory (bom.json)"
    )


def bom_summary(manifest: dict) -> dict:
    """The BOM's essentials: per source license, attribution, documents and tokens; totals; tokenizer hash."""
    if "sources" not in manifest:
        raise ValueError(
            "not a bill of materials (no 'sources'): pass a prepared data directory, a run directory or a checkpoint "
            "directory (a checkpoint's manifest.json lists its files, its bom.json the data)"
        )
    sources = {
        name: {
            "license": s["license"],
            "attribution": s.get("attribution", ""),
            "docs_kept": s["docs_kept"],
            "docs_in": s["docs_in"],
            "tokens": s["tokens"],
            "train_tokens": s.get("train_tokens", s["tokens"]),
            "files": len(s.get("files", [])),
        }
        for name, s in manifest["sources"].items()
    }
    licenses: dict[str, int] = {}
    for s in sources.values():
        licenses[s["license"]] = licenses.get(s["license"], 0) + s["train_tokens"]
    return {
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "train_tokens": manifest["splits"]["train"]["tokens"],
        "val_tokens": manifest["splits"]["val"]["tokens"],
        "train_tokens_by_license": dict(sorted(licenses.items())),
        "sources": sources,
    }


def format_summary(summary: dict, where: Path) -> str:
    lines = [f"bill of materials: {where}", f"tokenizer sha256: {summary['tokenizer_sha256']}"]
    lines.append(f"{'source':<20} {'license':<28} {'docs kept':>12} {'train tokens':>14}  attribution")
    for name, s in summary["sources"].items():
        docs = f"{s['docs_kept']:,}/{s['docs_in']:,}"
        lines.append(f"{name:<20} {s['license']:<28} {docs:>12} {s['train_tokens']:>14,}  {s['attribution']}")
    lines.append(f"train tokens {summary['train_tokens']:,}, validation tokens {summary['val_tokens']:,}")
    for lic, n in summary["train_tokens_by_license"].items():
        lines.append(f"  {lic}: {n:,} train tokens")
    return "\n".join(lines)


_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--experimental-rerun"}
_HYDRA_FLAGS_WITH_VALUE |= {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def hydra_args(args: list[str]) -> list[str]:
    """The documented `PATH [--json]` as the Hydra overrides `path=PATH json=true`; other arguments pass through."""
    out, paths = [], []
    takes_value = False
    for a in args:
        if a == "--json":
            out.append("json=true")
        elif takes_value or a.startswith("-") or "=" in a:
            out.append(a)  # a Hydra flag (--help, --cfg job), its value, or an override
        else:
            paths.append(a)
        takes_value = a in _HYDRA_FLAGS_WITH_VALUE
    if len(paths) > 1:
        raise ValueError(f"one PATH, got {len(paths)}: {' '.join(paths)}")
    return out + [f"path={hydra_quote(p)}" for p in paths]


@hydra.main(config_path="../configs", config_name="bom", version_base="1.3")
def run_cli(cfg) -> None:
    with user_errors():
        root: BomRoot = to_object_strict(cfg)
        if not root.path:
            raise ValueError(USAGE)
        where = find_bom(root.path)
        try:
            summary = bom_summary(json.loads(where.read_text()))
        except KeyError as err:
            raise ValueError(f"{where}: not a complete bill of materials (no {err})") from None
    print(json.dumps(summary, ensure_ascii=False) if root.json else format_summary(summary, where))


def main() -> None:
    try:
        sys.argv[1:] = hydra_args(sys.argv[1:])
    except ValueError as err:
        print(f"error: {err}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    run_cli()


if __name__ == "__main__":
    main()
