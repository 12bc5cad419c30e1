"""Rerun the README's demos and quick benchmarks; print the README's figures next to the new
ones and flag every figure that moved.

    python benchmarks/readme_figures.py                    # all (about 30 min on 2 idle cores)
    python benchmarks/readme_figures.py --only demo,demo_lm
    python benchmarks/readme_figures.py --list             # what would run, nothing run
    python benchmarks/readme_figures.py --logs DIR         # also keep each command's output
    python benchmarks/readme_figures.py --from-logs DIR    # compare saved outputs, run nothing

For each source in SOURCES: the README section is found by its heading; the command must
appear verbatim in one of the section's bash blocks (what runs is what the README tells a user
to type: a source whose command the README no longer prints is reported, not run); it runs in
a fresh folder (so `runs/NAME` is new, not a finished run that would only resume) holding
links to configs/ and benchmarks/, and its wall time is measured. Its output gives metrics by
name (`final: key value, ...` for crate_jax.main; the benchmarks' own lines); the spec maps
every number of the compared README cells, in order, to one of them (None: not measured, such
as a chance level). A figure moved when the new value does not round to the README's digits
(metrics), or differs by more than --time-tolerance (wall times and other timings). A README
row whose count of numbers no longer matches its spec is reported as out of date, not guessed.
Run it on an idle machine: the wall times are the machine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALL = "wall_s"  # the metric every run has: its wall time in seconds

# --- the README ---------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


def documentation(path: str | None = None) -> str:
    """The text figures are read from: `path`, or README.md followed by every docs/*.md page
    (the README is the front door; the demos' and benchmarks' tables live in docs/)."""
    paths = [path] if path else [os.path.join(ROOT, "README.md"),
                                 *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    texts = []
    for one in paths:
        with open(one, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def sections(text: str) -> dict[str, str]:
    """{heading: the text up to the next heading of any level} of a Markdown document,
    headings without their '#'s (code blocks are not headings)."""
    out: dict[str, str] = {}
    heading, body, fenced = None, [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            if heading is not None:
                out[heading] = "\n".join(body)
            heading, body = line.lstrip("#").strip(), []
        else:
            body.append(line)
    if heading is not None:
        out[heading] = "\n".join(body)
    return out


def find_section(text: str, heading: str) -> str | None:
    """The section whose heading starts with `heading`."""
    found = [body for h, body in sections(text).items() if h.startswith(heading)]
    return found[0] if found else None


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row; an escaped pipe (\\|) stays in its cell."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|") if line.strip() != "|" else "")
    return [c.strip().replace("\\|", "|") for c in cells]


def tables(text: str) -> list[Table]:
    """The Markdown tables of `text` (a header row, a |---| row, body rows)."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1]):
            header, rows, i = split_row(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            out.append(Table(header, rows))
        else:
            i += 1
    return out


def bash_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks of `text`: continued lines (a trailing \\) joined,
    comments dropped, `a && b` split into a and b."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            out += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return out


def printed(readme: str, command: str) -> bool:
    """Whether the README tells a user to type `command`: a command of a bash block, or
    `inline code` in the text."""
    return command in bash_commands(readme) or f"`{command}`" in readme


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    decimals: int  # digits after the point as printed (the rounding a metric is read at)
    seconds: bool  # a duration ("3 min 59 s", "1.47 s"), in seconds


_DURATION = r"(?:(\d+)\s*h\s*)?(?:(\d+)\s*min\s*)?(\d+(?:\.\d+)?)\s*s\b"
_NUMBER = r"\d[\d,]*(?:\.\d+)?"


def figures(cell: str) -> list[Figure]:
    """The numbers of a table cell in order: durations ('3 min 59 s', '2.17 s', '1 h 5 min 0
    s') as one figure in seconds, other numbers ('1,225', '0.895', '−40') as they are."""
    out = []
    # a number starts at a sign or a digit that no letter, point or hyphen precedes: the 1
    # of "top-1" or "R@1"'s label-like digits inside words are not figures ("@" is allowed)
    for m in re.finditer(rf"(?P<dur>(?<![\w.\-−]){_DURATION})|"
                         rf"(?P<num>(?<![\w.\-−]){_NUMBER}|(?<![\w.])[−-]\d[\d,]*(?:\.\d+)?)",
                         cell):
        if m.group("dur"):
            h, mins, s = re.fullmatch(_DURATION, m.group("dur")).groups()
            value = int(h or 0) * 3600 + int(mins or 0) * 60 + float(s)
            out.append(Figure(value, _decimals(s), True))
        else:
            text = m.group("num").replace(",", "").replace("−", "-")
            out.append(Figure(float(text), _decimals(text), False))
    return out


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


# --- comparing ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timed:
    """A key compared with --time-tolerance: a timing, or a figure derived from one."""
    key: Any


# A key: a metric name, a function of the metrics (a derived figure), None (a number that is
# not measured, such as a chance level: skipped), or one of those wrapped in Timed.
Key = Any


def moved(old: Figure, new: float, timing: bool, time_tolerance: float) -> bool:
    """Whether `new` differs from the README's `old`: a timing by more than the relative
    tolerance, any other figure when it does not round to the digits the README prints."""
    if math.isnan(new):
        return True
    if timing or old.seconds:
        return abs(new - old.value) > time_tolerance * abs(old.value)
    return round(new, old.decimals) != round(old.value, old.decimals)


@dataclasses.dataclass
class Compared:
    label: str  # the row and column, or the start of the prose
    old: Figure | None
    new: float | None
    moved: bool
    note: str = ""  # the metric compared, or what went wrong


def _new_value(key: Key, metrics: dict) -> float | None:
    if callable(key):
        try:
            return float(key(metrics))
        except KeyError:
            return None
    return metrics.get(key)


def compare_cells(label: str, cells: dict[str, str], keys: dict[str, list[Key]],
                  metrics: dict, time_tolerance: float) -> list[Compared]:
    """One README table row against new metrics: cells {column: text}, keys {column: [one
    key per number of the cell, in order]}."""
    out = []
    for column, column_keys in keys.items():
        where = f"{label} / {column}" if column else label
        if column not in cells:
            out.append(Compared(where, None, None, True, "README: no such column"))
            continue
        found = figures(cells[column])
        if len(found) != len(column_keys):
            out.append(Compared(where, None, None, True, f"README: {len(found)} numbers where "
                                f"the spec expects {len(column_keys)} (spec out of date)"))
            continue
        for old, key in zip(found, column_keys, strict=True):
            if key is None:
                continue
            timing = isinstance(key, Timed) or key == WALL
            key = key.key if isinstance(key, Timed) else key
            name = key if isinstance(key, str) else "derived"
            new = _new_value(key, metrics)
            if new is None:
                out.append(Compared(where, old, None, True, f"{name}: not in the output"))
            else:
                out.append(Compared(where, old, new, moved(old, new, timing, time_tolerance),
                                    name))
    return out


def compare_table(table: Table, rows: dict[str, dict[str, list[Key]]], metrics: dict,
                  time_tolerance: float) -> list[Compared]:
    """Every spec'd row of `table`, found by the start of its first cell."""
    out = []
    for prefix, keys in rows.items():
        row = next((r for r in table.rows if r[0].startswith(prefix)), None)
        if row is None:
            out.append(Compared(prefix, None, None, True, "README: no such row"))
            continue
        out += compare_cells(prefix, dict(zip(table.header, row, strict=False)), keys,
                             metrics, time_tolerance)
    return out


def compare_prose(text: str, prose: list[tuple[str, Key]], metrics: dict,
                  time_tolerance: float) -> list[Compared]:
    """Figures in running text: (a regex whose group 1 holds one figure, its key)."""
    out = []
    for pattern, key in prose:
        m = re.search(pattern, text, flags=re.S)
        if m is None:
            out.append(Compared(pattern, None, None, True, "README: text not found"))
            continue
        label = " ".join(m.group(0).split())[:70]
        out += compare_cells(label, {"": m.group(1)}, {"": [key]}, metrics, time_tolerance)
    return out


# --- outputs ----------------------------------------------------------------------------------

def main_metrics(output: str) -> dict[str, float]:
    """The last `final: key value, key value` line crate_jax.main prints."""
    lines = re.findall(r"^final: (.*)$", output, flags=re.M)
    if not lines:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\S+) (-?[0-9.eE+-]+|nan)(?:,|$)", lines[-1])}


def model_step_metrics(output: str) -> dict[str, float]:
    """benchmarks/model_step.py's report (its first model)."""
    out = {}
    m = re.search(r"forward ([\d.]+) GFLOPs/img", output)
    if m:
        out["forward_gflops_per_image"] = float(m[1])
    m = re.search(r"step ([\d,.]+) ms \(median", output)
    if m:
        out["step_s"] = float(m[1].replace(",", "")) / 1e3
    for kind in ("model", "hardware"):
        m = re.search(rf"{kind} FLOPs +([\d.]+) GFLOP/step +([\d.]+) GFLOP/s", output)
        if m:
            out[f"{kind}_gflop_per_step"], out[f"{kind}_gflop_per_s"] = float(m[1]), float(m[2])
    m = re.search(r"matmul rate at the step's shapes ([\d.]+) GFLOP/s", output)
    if m:
        out["matmul_gflop_per_s"] = float(m[1])
    m = re.search(r"model FLOP rate / matmul rate: ([\d.]+)", output)
    if m:
        out["fraction"] = float(m[1])
    return out


def compile_time_metrics(output: str) -> dict[str, float]:
    """benchmarks/compile_time.py's rows: {'scanned/12': total seconds, ...}."""
    return {f"{layers}/{depth}": float(total) for depth, layers, total in re.findall(
        r"^\s*(\d+)\s+(scanned|unrolled)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s*$", output, flags=re.M)}


def plan_metrics(output: str) -> dict[str, float]:
    """python -m crate_jax.plan's first table: parameters, model and hardware FLOPs per step
    (in total, PFLOP; per example, GFLOP)."""
    out = {}
    m = re.search(r"^\s*parameters\s+([\d,]+)", output, flags=re.M)
    if m:
        out["parameters"] = float(m[1].replace(",", ""))
    scale = {"PFLOP": 1e15, "TFLOP": 1e12, "GFLOP": 1e9, "MFLOP": 1e6}
    for kind, label in (("model", "model FLOPs per step"), ("hardware", "hardware FLOPs")):
        m = re.search(rf"{label}\s+([\d.]+) (\w+) in total, ([\d.]+) (\w+) per device, "
                      rf"([\d.]+) (\w+) per example", output)
        if m:
            out[f"{kind}_pflop"] = float(m[1]) * scale[m[2]] / 1e15
            out[f"{kind}_tflop_per_device"] = float(m[3]) * scale[m[4]] / 1e12
            out[f"{kind}_gflop_per_example"] = float(m[5]) * scale[m[6]] / 1e9
    return out


# --- the sources --------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    name: str
    command: str  # as the README prints it (in a bash block or as `inline code`)
    section: str  # the heading (its start) of the section with the table and the prose
    parse: Callable[[str], dict[str, float]] = main_metrics
    table: str | None = None  # the first header cell of the table
    rows: dict[str, dict[str, list[Any]]] = dataclasses.field(default_factory=dict)
    prose: list[tuple[str, Any]] = dataclasses.field(default_factory=list)


def _minutes(m: dict) -> float:
    return m[WALL] / 60


def _model_step_row(model: str) -> dict[str, dict[str, list[Any]]]:
    return {model: {"fwd GFLOPs/img": ["forward_gflops_per_image"],
                    "step": [Timed("step_s")],
                    "model GFLOP/s": [Timed("model_gflop_per_s")],
                    "hardware GFLOP/s": [Timed("hardware_gflop_per_s")],
                    "matmul GFLOP/s at its shapes": [Timed("matmul_gflop_per_s")],
                    "model / matmul rate": [Timed("fraction")]}}


_DEPTHS = ("6", "12", "24", "32")

SOURCES = [
    Source("demo", "python -m crate_jax.main --config=configs/demo.py", "Quick start",
           table="metric", rows={
               "zero-shot top-1 on the 8 held-out pairs": {
                   "value": ["zeroshot_heldout/top1"], "chance": [None]},
               "zero-shot top-1 on the held-out pairs, scored among all": {
                   "value": ["zeroshot_heldout_all64/top1"], "chance": [None]},
               "image→text / text→image recall@1": {
                   "value": ["retrieval/i2t_R@1", "retrieval/t2i_R@1"], "chance": [None]},
               "image→text / text→image recall@5": {
                   "value": ["retrieval/i2t_R@5", "retrieval/t2i_R@5"], "chance": [None]},
               "k-NN / linear probe top-1": {
                   "value": ["probe/knn_top1", "probe/linear_top1"], "chance": [None]}},
           prose=[(r"The demo trains for [\d,]+ steps \(about ([\d.]+) minutes",
                   Timed(_minutes))]),
    Source("demo_classification", "python -m crate_jax.main "
           "--config=configs/demo_classification.py --workdir=runs/demo_classification",
           "Training", prose=[(r"validation top-1: (\d+) %", lambda m: 100 * m["val/top1"]),
                              (r"steps in about (\d+) minutes", Timed(_minutes))]),
    Source("demo_mae", "python -m crate_jax.main --config=configs/demo_mae.py",
           "Self-supervised CRATE", table="demo", rows={"`demo_mae.py`": {
               "held-out result": [
                   "reconstruction/mse", "reconstruction/mean_colour_mse",
                   lambda m: 100 * (m["reconstruction/mse"]
                                    / m["reconstruction/mean_colour_mse"] - 1),
                   "probe/knn_top1", "probe/linear_top1", None, None],
               "wall time": [WALL]}}),
    Source("demo_simdino", "python -m crate_jax.main --config=configs/demo_simdino.py",
           "Self-supervised CRATE", table="demo", rows={"`demo_simdino.py`": {
               "held-out result": [
                   "probe/knn_top1", "probe_random_init/knn_top1", "probe/linear_top1",
                   "probe_random_init/linear_top1", None, "probe/coding_rate",
                   "probe_random_init/coding_rate"],
               "wall time": [WALL]}}),
    Source("demo_lm", "python -m crate_jax.main --config=configs/demo_lm.py", "Language models",
           table="model", rows={
               "CRATE-α": {"parameters": ["val/params"],
                           "validation perplexity": ["val/perplexity"]},
               "GPT-2": {"parameters": ["val/baseline_params"],
                         "validation perplexity": ["val/baseline_perplexity"]},
               "unigram": {"validation perplexity": ["val/unigram_perplexity"]}},
           prose=[(r"run as typed above: (\d+ min \d+ s) for", WALL)]),
    Source("demo_tost", "python -m crate_jax.main --config=configs/demo_tost.py",
           "Demo: ToST against CRATE", table="model", rows={
               f"{label} (": {"validation top-1": [f"{name}/top1"],
                              "median step": [Timed(f"{name}/step_s")],
                              "step memory per device": [f"{name}/step_memory_mib"]}
               for name, label in (("tost", "ToST"), ("crate", "CRATE"))},
           prose=[(r"as typed took (\d+ min \d+ s)", WALL)]),
    Source("model_step_crate_b16", "python benchmarks/model_step.py --model crate-b/16 --batch 8",
           "Benchmarks", parse=model_step_metrics, table="model",
           rows=_model_step_row("crate-b/16")),
    Source("model_step_crate_alpha_b32",
           "python benchmarks/model_step.py --model crate-alpha-b/32 --batch 8", "Benchmarks",
           parse=model_step_metrics, table="model", rows=_model_step_row("crate-alpha-b/32")),
    Source("compile_time", "python benchmarks/compile_time.py --unrolled",
           "0. Plan the memory first", parse=compile_time_metrics, table="image depth",
           rows={layers: {d: [Timed(f"{layers}/{d}")] for d in _DEPTHS}
                 for layers in ("scanned", "unrolled")}),
    Source("plan_clipa_h14", "python -m crate_jax.plan --config=configs/clipa_h14.py "
           "--mesh=fsdp:64", "0. Plan the memory first", parse=plan_metrics,
           prose=[(r"fsdp:64`: ([\d,]+) parameters", "parameters"),
                  (r"model FLOPs ([\d.]+) PFLOP per step", "model_pflop"),
                  (r"hardware FLOPs ([\d.]+) PFLOP per step", "hardware_pflop")]),
]


def compare_source(source: Source, readme: str, metrics: dict, time_tolerance: float
                   ) -> list[Compared]:
    """Every figure of `source` in the README against `metrics` (its run's)."""
    text = find_section(readme, source.section)
    if text is None:
        return [Compared(source.section, None, None, True, "README: no such section")]
    out = []
    if source.table is not None:
        table = next((t for t in tables(text) if t.header[0] == source.table), None)
        if table is None:
            out.append(Compared(source.table, None, None, True, "README: no such table"))
        else:
            out += compare_table(table, source.rows, metrics, time_tolerance)
    return out + compare_prose(text, source.prose, metrics, time_tolerance)


# --- running -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    output: str
    wall_s: float
    returncode: int


def run(command: str, folder: str) -> Run:
    """`command` in `folder` (links to the checkout's configs/ and benchmarks/ there), this
    interpreter for `python`; stdout and stderr together."""
    for name in ("configs", "benchmarks"):
        link = os.path.join(folder, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(ROOT, name), link)
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=folder, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    return Run(proc.stdout, time.perf_counter() - t0, proc.returncode)


def save_log(path: str, result: Run) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# wall_s {result.wall_s:.3f} exit {result.returncode}\n{result.output}")


def load_log(path: str) -> Run:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, _, output = text.partition("\n")
    m = re.fullmatch(r"# wall_s ([\d.]+) exit (-?\d+)", head)
    if m is None:
        raise ValueError(f"{path}: not a log written by --logs (first line {head!r})")
    return Run(output, float(m[1]), int(m[2]))


# --- report ------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{seconds:.1f} s"


def _value(value: float, like: Figure) -> str:
    """`value` written as the README writes `like`: a duration, or with its decimals."""
    return _duration(value) if like.seconds else f"{value:,.{like.decimals}f}"


def render(source: Source, result: Run, compared: list[Compared]) -> str:
    """The source's README figures, each with its new value; MOVED where it moved."""
    lines = [f"== {source.name}: {source.command}  (exit {result.returncode}, "
             f"{_duration(result.wall_s)})"]
    for c in compared:
        if c.old is None:
            lines.append(f"   {c.label}: {c.note}   MOVED")
            continue
        new = "—" if c.new is None else _value(c.new, c.old)
        lines.append(f"   {c.label}: README {_value(c.old.value, c.old)}, now {new}"
                     f"{'   MOVED' if c.moved else ''}   ({c.note})")
    if result.returncode:
        lines.append("   the command failed; its output ends:\n" + result.output[-2000:])
    return "\n".join(lines)


def describe(source: Source, readme: str) -> str:
    """--list: what would run and the README figures it would be compared with."""
    empty = {WALL: math.nan}
    lines = [f"== {source.name}: {source.command}"
             + ("" if printed(readme, source.command) else "   NOT PRINTED in the README")]
    for c in compare_source(source, readme, empty, 0.0):
        old = "" if c.old is None else _value(c.old.value, c.old)
        lines.append(f"   {c.label}: README {old}   ({c.note})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated source names "
                        f"({', '.join(s.name for s in SOURCES)})")
    parser.add_argument("--list", action="store_true", help="print the sources, run nothing")
    parser.add_argument("--logs", default=None, help="also write each output to DIR/NAME.log")
    parser.add_argument("--from-logs", default=None, help="compare DIR/NAME.log, run nothing")
    parser.add_argument("--time-tolerance", type=float, default=0.10,
                        help="relative change of a timing that counts as moved")
    parser.add_argument("--readme", default=None,
                        help="one Markdown file (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    sources = SOURCES
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {s.name for s in SOURCES})
        if unknown:
            parser.error(f"--only: unknown source(s) {unknown}; known: "
                         f"{[s.name for s in SOURCES]}")
        sources = [s for s in SOURCES if s.name in names]
    readme = documentation(args.readme)
    if args.list:
        print("\n".join(describe(s, readme) for s in sources))
        return 0
    moved_total, count = [], 0
    for source in sources:
        if not printed(readme, source.command):
            print(f"== {source.name}: the README no longer prints {source.command!r}; "
                  "not run (update SOURCES)")
            moved_total.append(f"{source.name}: command not in the README")
            continue
        if args.from_logs:
            result = load_log(os.path.join(args.from_logs, f"{source.name}.log"))
        else:
            with tempfile.TemporaryDirectory(prefix=f"readme_{source.name}_") as folder:
                result = run(source.command, folder)
            if args.logs:
                os.makedirs(args.logs, exist_ok=True)
                save_log(os.path.join(args.logs, f"{source.name}.log"), result)
        metrics = {**source.parse(result.output), WALL: result.wall_s}
        compared = compare_source(source, readme, metrics, args.time_tolerance)
        print(render(source, result, compared), flush=True)
        count += len(compared)
        moved_total += [f"{source.name}: {c.label}" for c in compared if c.moved]
        if result.returncode:
            moved_total.append(f"{source.name}: exit status {result.returncode}")
    print(f"\n{count} figures compared; {len(moved_total)} moved or failed"
          + "".join(f"\n  {m}" for m in moved_total))
    return 1 if moved_total else 0


if __name__ == "__main__":
    sys.exit(main())
