"""benchmarks/readme_figures.py: the README's tables and prose figures are parsed as printed,
each figure is compared with what a rerun printed under the right rule, and the spec of
every source still matches the README (its command printed, its rows and numbers there)."""

from __future__ import annotations

import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import model_step  # noqa: E402
import readme_figures as rf  # noqa: E402

README = """# Title

## Quick start

```bash
pip install -r requirements.txt && python -m tool --config=demo.py
python -m long --first \\
    --second   # a comment
```

The demo trains for 1,200 steps (about 3.5 minutes on the machine). It ends with:

| metric | value | chance |
|---|---|---|
| top-1 on the `a\\|b` pairs | 0.895 | 0.125 |
| recall@1 i→t / t→i | 0.268 / 0.270 | 0.003 |

### Demos

| demo | model | result | wall time |
|---|---|---|---|
| `mae.py` | width 96 | MSE **0.271** against 0.451 (−40 %); k-NN top-1 0.174 | 3 min 59 s |

## Other
`python tool.py --flag` prints 1,225 (1,155) pairs.
"""


def test_sections_tables_and_commands_are_parsed_as_printed():
    sections = rf.sections(README)
    assert list(sections) == ["Title", "Quick start", "Demos", "Other"]
    (table,) = rf.tables(sections["Quick start"])
    assert table.header == ["metric", "value", "chance"]
    assert table.rows[0] == ["top-1 on the `a|b` pairs", "0.895", "0.125"]  # escaped pipe
    assert rf.find_section(README, "Quick") == sections["Quick start"]
    assert rf.find_section(README, "Missing") is None
    commands = rf.bash_commands(README)
    assert commands == ["pip install -r requirements.txt", "python -m tool --config=demo.py",
                        "python -m long --first --second"]
    assert rf.printed(README, "python -m tool --config=demo.py")
    assert rf.printed(README, "python tool.py --flag")  # inline code
    assert not rf.printed(README, "python -m tool --config=demo")  # a prefix is not the command


def test_figures_reads_numbers_durations_and_signs():
    def read(cell):
        return [(f.value, f.decimals, f.seconds) for f in rf.figures(cell)]

    cell = rf.tables(rf.sections(README)["Demos"])[0].rows[0][2]
    assert read(cell) == [(0.271, 3, False), (0.451, 3, False), (-40.0, 0, False),
                          (0.174, 3, False)]  # the 1 of "top-1" is no figure
    assert read("3 min 59 s") == [(239.0, 0, True)]
    assert read("1 h 2 min 3 s, 1.47 s") == [(3723.0, 0, True), (1.47, 2, True)]
    assert read("1,225 (1,155)") == [(1225.0, 0, False), (1155.0, 0, False)]
    assert read("top-1 and k-NN") == []


def test_a_metric_moves_when_it_no_longer_rounds_to_the_readme_a_timing_by_the_tolerance():
    old = rf.Figure(0.895, 3, False)
    assert not rf.moved(old, 0.8954, False, 0.1)
    assert rf.moved(old, 0.8956, False, 0.1) and rf.moved(old, 0.890, False, 0.1)
    assert rf.moved(old, math.nan, False, 0.1)
    wall = rf.Figure(239.0, 0, True)
    assert not rf.moved(wall, 260.0, False, 0.1) and rf.moved(wall, 265.0, False, 0.1)
    rate = rf.Figure(142.0, 0, False)
    assert not rf.moved(rate, 150.0, True, 0.1) and rf.moved(rate, 160.0, True, 0.1)


def _source(**kw) -> rf.Source:
    base = dict(name="demo", command="python -m tool --config=demo.py", section="Quick start",
                table="metric",
                rows={"top-1 on the": {"value": ["top1"], "chance": [None]},
                      "recall@1": {"value": ["i2t", "t2i"], "chance": [None]}},
                prose=[(r"about ([\d.]+) minutes", rf.Timed(lambda m: m[rf.WALL] / 60))])
    return rf.Source(**{**base, **kw})


def test_a_source_is_compared_figure_by_figure():
    metrics = {"top1": 0.8951, "i2t": 0.268, "t2i": 0.281, rf.WALL: 240.0}  # 4 minutes
    compared = rf.compare_source(_source(), README, metrics, 0.1)
    assert [(c.old.value, c.new, c.moved) for c in compared] == [
        (0.895, 0.8951, False), (0.268, 0.268, False), (0.270, 0.281, True),
        (3.5, 4.0, True)]  # 4 minutes is 14 % more than 3.5
    assert compared[2].label == "recall@1 / value" and compared[2].note == "t2i"


def test_a_stale_spec_or_a_missing_metric_is_reported_not_guessed():
    mae = rf.Source("mae", "x", "Demos", table="demo", rows={"`mae.py`": {
        "result": ["mse", "mean", lambda m: 100 * (m["mse"] / m["mean"] - 1), "knn"],
        "wall time": [rf.WALL]}})
    metrics = {"mse": 0.271, "mean": 0.451, "knn": 0.18, rf.WALL: 239.4}
    compared = rf.compare_source(mae, README, metrics, 0.1)
    assert [c.moved for c in compared] == [False, False, False, True, False]
    metrics["knn"] = 0.174
    del metrics["mean"]
    notes = [c.note for c in rf.compare_source(mae, README, metrics, 0.1) if c.moved]
    assert notes == ["mean: not in the output", "derived: not in the output"]
    stale = rf.Source("mae", "x", "Demos", table="demo",
                      rows={"`mae.py`": {"result": ["mse"]}, "`gone.py`": {"result": [None]}})
    notes = [c.note for c in rf.compare_source(stale, README, metrics, 0.1)]
    assert notes == ["README: 4 numbers where the spec expects 1 (spec out of date)",
                     "README: no such row"]
    assert rf.compare_source(_source(section="Nowhere"), README, {}, 0.1)[0].note == (
        "README: no such section")


def test_outputs_are_read_into_metrics():
    out = "step 2/4 | loss 1.0\nfinal: a/top1 0.5000, b/R@1 0.2500, c nan\n"
    got = rf.main_metrics("final: a/top1 0.1000\n" + out)
    assert got["a/top1"] == 0.5 and got["b/R@1"] == 0.25 and math.isnan(got["c"])
    compile_out = ("CLIPA-H/14 ...\n image depth    layers  trace+lower s  compile s  total s\n"
                   "          6   scanned            1.2        2.2      3.4\n"
                   "         32  unrolled            4.0       12.8     16.8\n")
    assert rf.compile_time_metrics(compile_out) == {"scanned/6": 3.4, "unrolled/32": 16.8}
    plan_out = ("  parameters            862,727,170\n"
                "  model FLOPs per step  12.10 PFLOP in total, 189.06 TFLOP per device, "
                "184.63 GFLOP per example\n"
                "  hardware FLOPs        14.20 PFLOP in total, 221.88 TFLOP per device, "
                "216.67 GFLOP per example\n")
    got = rf.plan_metrics(plan_out)
    assert got["parameters"] == 862_727_170 and got["hardware_pflop"] == pytest.approx(14.2)
    assert got["model_gflop_per_example"] == pytest.approx(184.63)


def test_model_step_report_reads_back():
    """What model_step.py prints is what readme_figures reads (the two scripts agree)."""
    from crate_jax.perf import MatmulShape, StepFlops

    shape = MatmulShape(1, 1576, 768, 768, "float32")
    r = dict(name="crate-b/16", params=86_000_000, forward_gflops=11.46, step_s=1.9,
             fastest_step_s=1.8, steps=15, compile_s=12.0, loss=6.9,
             flops=StepFlops(model=275e9, hardware=290e9), dot_flops=250e9, dot_s=1.25,
             fastest_dot_s=1.2, per_shape={shape: 0.01}, shapes={shape: 125}, batch=8)
    got = rf.model_step_metrics(model_step.report(r, show_shapes=True))
    assert got["step_s"] == pytest.approx(1.9)
    assert got["forward_gflops_per_image"] == pytest.approx(11.46)
    assert got["model_gflop_per_s"] == pytest.approx(275 / 1.9, abs=0.05)
    assert got["hardware_gflop_per_s"] == pytest.approx(290 / 1.9, abs=0.05)
    assert got["matmul_gflop_per_s"] == pytest.approx(200.0)
    assert got["fraction"] == pytest.approx(275 / 1.9 / 200, abs=0.005)


def test_from_logs_prints_both_figures_and_flags_what_moved(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    logs = tmp_path / "logs"
    logs.mkdir()
    rf.save_log(str(logs / "demo.log"), rf.Run("final: top1 0.8950, i2t 0.2680, t2i 0.2700\n",
                                               205.0, 0))
    monkeypatch.setattr(rf, "SOURCES", [_source()])
    assert rf.main(["--from-logs", str(logs), "--readme", str(readme)]) == 0
    assert "top-1 on the / value: README 0.895, now 0.895" in capsys.readouterr().out
    rf.save_log(str(logs / "demo.log"), rf.Run("final: top1 0.8800, i2t 0.2680\n", 205.0, 1))
    assert rf.main(["--from-logs", str(logs), "--readme", str(readme)]) == 1
    out = capsys.readouterr().out
    assert "README 0.895, now 0.880   MOVED" in out
    assert "t2i: not in the output" in out and "demo: exit status 1" in out
    monkeypatch.setattr(rf, "SOURCES", [_source(command="python -m gone")])
    assert rf.main(["--from-logs", str(logs), "--readme", str(readme)]) == 1
    assert "the README no longer prints 'python -m gone'; not run" in capsys.readouterr().out


def test_every_source_matches_the_readme():
    """Each source's command is one the README prints, and every figure its spec names is in
    the README with the count of numbers the spec expects: a README edit that moves a figure
    out of reach fails here, not silently in a later rerun."""
    readme = rf.documentation()  # README.md, then docs/*.md
    for source in rf.SOURCES:
        assert rf.printed(readme, source.command), source.command
        keys = [k for row in source.rows.values() for ks in row.values() for k in ks]
        keys += [k for _, k in source.prose]
        for compared in rf.compare_source(source, readme, {}, 0.1):
            assert not compared.note.startswith("README"), (source.name, compared)
        assert len(rf.compare_source(source, readme, {}, 0.1)) == sum(
            k is not None for k in keys), source.name
