"""train.report: offline comparison of run directories, with plots and comparability notes."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.helpers import run_module


@pytest.mark.slow
def test_report_compares_runs_and_flags_different_budgets(trained_run, tmp_path):
    other = tmp_path / "runs" / "longer"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 20
    cfg["optim"]["lr"] = 0.002
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    run_module("train.report", str(trained_run), str(tmp_path / "runs"), f"out={out}")
    text = (out / "report.md").read_text()
    assert "| run | optim.lr | train.max_steps | final val | best val |" in text
    assert "val kowiki" in text and "tokens/s" in text and "MFU" in text and "wall s" in text
    assert "not comparable" in text and "token budget" in text
    for png in ("loss_by_step.png", "loss_by_tokens.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_without_runs_is_a_clear_error(tmp_path):
    proc = run_module("train.report", str(tmp_path), f"out={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "no run directories" in proc.stderr


def _run(tmp_path, name: str, config: dict, losses=(3.0, 2.5)):
    from train.tools.report import Run, flatten

    rows = [{"step": i + 1, "loss": v, "tokens": 100 * (i + 1), "tokens_per_s": 10.0, "mfu": 0.1} for i, v in
            enumerate(losses)]  # fmt: skip
    rows.append({"step": len(losses), "val_loss": losses[-1] + 0.1, "tokens": 100 * len(losses)})
    return Run(tmp_path / name, flatten(config), rows)


def _data(name: str, n_sources: int, weight: float = 1.0) -> dict:
    sources = {f"src{i}": {"paths": [f"/d/{i}/*.jsonl"], "license": "CC0-1.0", "weight": weight, "text": "text"}
               for i in range(n_sources)}  # fmt: skip
    return {"name": name, "path": f"/prepared/{name}", "sources": sources}


def test_report_groups_data_settings_under_the_data_name(tmp_path):
    from train.tools.report import columns, data_lines, summarize, table_lines

    a = _run(tmp_path, "a", {"data": _data("ko_sample", 3), "optim": {"lr": 1e-3}})
    b = _run(tmp_path, "b", {"data": _data("shared_all", 14), "optim": {"lr": 1e-3}})
    c = _run(tmp_path, "c", {"data": _data("shared_all", 14, weight=2.0), "optim": {"lr": 1e-3}})
    runs = [a, b, c]
    assert columns(runs) == ["data"]  # not dozens of data.sources.* columns
    lines = table_lines(runs, [summarize(r) for r in runs])
    assert lines[0].startswith("| run | data | final val |"), lines[0]
    assert lines[2].startswith("| a | ko_sample |")
    # Same name, other settings: the name alone would hide the difference, so a short hash of the section follows.
    b_cell, c_cell = lines[3].split(" | ")[1], lines[4].split(" | ")[1]
    assert b_cell.startswith("shared_all #") and c_cell.startswith("shared_all #") and b_cell != c_cell
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    listed = data_lines(runs)
    assert listed[1] == "## Data configs" and any(
        x.startswith("- ko_sample: src0 (weight 1.0, CC0-1.0)") for x in listed
    )


def test_report_table_cells_escape_newlines_and_pipes(tmp_path):
    from train.tools.report import md_cell, summarize, table_lines

    template = "{% for m in messages %}\n{{ m | trim }}\n{% endfor %}"
    runs = [_run(tmp_path, "a", {"chat": {"template": template}}), _run(tmp_path, "b", {"chat": {"template": "x"}})]
    lines = table_lines(runs, [summarize(r) for r in runs])
    assert len(lines) == 4  # header, rule, one line per run: the newline did not break the row
    assert "{% for m in messages %}<br>{{ m \\| trim }}<br>{% endfor %}" in lines[2], lines[2]
    assert all(line.replace("\\|", "").count("|") == lines[0].count("|") for line in lines)
    assert md_cell("a|b\r\nc <redacted>") == "a\\|b<br>c &lt;redacted>"


def test_report_plot_legends_stay_inside_the_image(tmp_path):
    import matplotlib.image

    from train.tools.report import columns, plot

    runs = [_run(tmp_path, f"r{i}", {"data": _data(f"mixture_{i}_" + "x" * 60, 3), "optim": {"lr": 10.0**-i}},
                 losses=(3.0, 2.5 - 0.1 * i)) for i in range(5)]  # fmt: skip
    out = tmp_path / "plots"
    out.mkdir()
    for name in plot(runs, columns(runs), out):
        img = matplotlib.image.imread(out / name)
        # The bottom rows hold legend text (not blank), and the image is taller than the 5-inch axes figure:
        # the canvas grew to hold the legend rather than cutting it off.
        assert img.shape[0] > 5 * 110
        assert (img[-img.shape[0] // 6 :, :, :3] < 0.5).any(), name
