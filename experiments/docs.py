"""Regenerate the parts of README.md, EXPERIMENTS.md and BENCHMARKS.md that come from results files.

  python -m experiments.docs            # rewrite every generated part from its file
  python -m experiments.docs --check    # exit 1, naming each part, if any differs (a test runs it)

A generated part sits between two HTML comments, which Markdown does not render:

  <!-- include: experiments/results/diagnosis/diagnosis_summary.md -->
  ... the file's text, or with `#Heading` after the path the text of its `## Heading` section,
  or with `#table N` its N-th Markdown table
  <!-- end include -->

  <!-- table: experiments/results/expert_count_top2/results_by_setting.csv
  | experts | eval loss (nats) |
  | {setting} | {eval_loss_mean:.4f} ± {eval_loss_std:.4f} |
  where: seeds=3
  -->
  ... one Markdown row per CSV row, from the row template (Python format fields named by the
  CSV's columns; an empty cell formats as '-' whatever its format spec, and ' ± -' is dropped;
  `{setting!x}` is a setting's expert count, `{setting!g}` its granularity, `{n!M}` a count in
  millions, `{n!G}` bytes in GiB); optional `where:` lines keep the rows whose column equals the value
  <!-- end table -->

The path may also be a glob of JSON files (`experiments/results/data_memory/*.json`): one row per
file, in name order, its top-level fields as the columns and `file` its name; or one JSON file
and a key (`generation_speed.json#rows`): the rows are that key's list of objects.

Two more kinds of spec line shape what the rows are:

  label: setting=num_experts=16,bias_update_speed=0.001 => aux-loss-free bias, γ 1e-3
      keeps only the labelled rows, in the order of the label lines, with `{label}` their text
      (a study's settings named as the text names them, not as the sweep spells them);
  pivot: rows=k,train_cf columns=eval_cf value=eval_loss
      one row per distinct value of the `rows` columns (first-seen order), with `{mean[c]}` and
      `{std[c]}` the mean and sample std (ddof=1, as the reports) of `value` over the CSV rows
      whose `columns` cell is c (several seeds' checkpoints re-evaluated, say); a single value
      has no std, so its ' ± -' is dropped.

So a number in these documents is either prose about a table or a table produced from the file
its marker names; a results file that changes without the document being regenerated fails the
suite (tests/test_docs.py).
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
import re
import string
import sys

from absl import app, flags

from switchmoe.analysis import seeds as seeds_lib

DOCUMENTS = ("README.md", "EXPERIMENTS.md", "BENCHMARKS.md")
_CHECK = flags.DEFINE_bool("check", False, "Report differences instead of rewriting.")

_INCLUDE = re.compile(
    r"(<!-- include: (?P<path>[^#\s]+)(?:#(?P<section>[^>]*?))? -->\n)(?P<body>.*?)(<!-- end include -->)",
    re.S,
)
_TABLE = re.compile(
    r"(<!-- table: (?P<path>\S+)\n(?P<spec>.*?)-->\n)(?P<body>.*?)(<!-- end table -->)", re.S
)


def _section(text: str, heading: str, path: str) -> str:
    lines = text.splitlines()
    m = re.fullmatch(r"table (\d+)", heading.strip())
    if m:  # the file's n-th Markdown table (a report with several under one heading)
        tables, current = [], []
        for line in lines + [""]:
            if line.startswith("|"):
                current.append(line)
            elif current:
                tables.append("\n".join(current))
                current = []
        n = int(m[1])
        if not 1 <= n <= len(tables):
            raise ValueError(f"{path} has {len(tables)} tables, not a table {n}")
        return tables[n - 1]
    for i, line in enumerate(lines):
        if line.startswith("#") and line.lstrip("#").strip() == heading.strip():
            level = len(line) - len(line.lstrip("#"))
            body = []
            for rest in lines[i + 1 :]:
                if rest.startswith("#") and len(rest) - len(rest.lstrip("#")) <= level:
                    break
                body.append(rest)
            return "\n".join(body).strip("\n")
    raise ValueError(f"{path} has no section headed {heading!r}")


class _Cells(string.Formatter):
    """Formats CSV cells: numbers as numbers, an empty cell as '-' whatever its spec, and the
    conversions `!x` (a sweep setting's expert count: 'num_experts=0,...' -> 'dense', '...=8' -> 8)
    and `!g` (its granularity m)."""

    def format_field(self, value, format_spec):
        if value is None or value == "":
            return "-"
        return super().format_field(value, format_spec)

    def convert_field(self, value, conversion):
        if conversion == "x":
            m = re.search(r"num_experts=(\d+)", str(value))
            return None if m is None else ("dense" if m[1] == "0" else int(m[1]))
        if conversion == "M":  # a count in millions
            return None if value is None else value / 1e6
        if conversion == "G":  # bytes in GiB
            return None if value is None else value / 2**30
        if conversion == "g":
            m = re.search(r"granularity=(\d+)", str(value))
            return None if m is None else int(m[1])
        return super().convert_field(value, conversion)


def _parse(cell):
    if not isinstance(cell, str):
        return cell  # a pivot's dict of cells
    if cell in ("", "None"):
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def _spec_lines(lines: list[str], kind: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith(kind + ":")]


def _labelled(rows: list[dict], labels: list[str], path: str) -> list[dict]:
    """The rows the `label:` lines name, in their order, each with its `label`."""
    out = []
    for line in labels:
        selector, _, text = line.partition(" => ")
        key, value = selector.split("=", 1)
        found = [r for r in rows if _matches(r, key, value)]
        if len(found) != 1:
            raise ValueError(f"{path}: label {line!r} matches {len(found)} rows, not 1")
        out.append({**found[0], "label": text.strip()})
    return out


def _pivoted(rows: list[dict], pivot: str, path: str) -> list[dict]:
    """One row per distinct `rows` key: mean and std of `value` per `columns` cell."""
    fields = dict(part.split("=", 1) for part in pivot.split())
    if set(fields) != {"rows", "columns", "value"}:
        raise ValueError(f"{path}: pivot needs rows=, columns= and value=; got {pivot!r}")
    keys = fields["rows"].split(",")
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        cells = groups.setdefault(tuple(r[k] for k in keys), {})
        cells.setdefault(r[fields["columns"]], []).append(float(r[fields["value"]]))
    out = []
    for key, cells in groups.items():
        stats = {c: seeds_lib.mean_std(values) for c, values in cells.items()}
        out.append(
            {
                **dict(zip(keys, key)),
                # a cell with no value formats as '-'
                "mean": collections.defaultdict(
                    lambda: None, {c: m for c, (m, _) in stats.items()}
                ),
                "std": collections.defaultdict(lambda: None, {c: s for c, (_, s) in stats.items()}),
            }
        )
    return out


def _rows(root: str, path: str) -> list[dict]:
    """A CSV's rows (cells as text); for a glob of JSON files one row per file in name order:
    its top-level fields (nested objects stay dicts, `{machine[cpu_count]}`) and `file`, its name;
    for 'file.json#key' the objects listed under that key."""
    path, _, key = path.partition("#")
    if not path.endswith(".json"):
        with open(os.path.join(root, path)) as f:
            return list(csv.DictReader(f))
    if key:  # one JSON file's list of rows
        with open(os.path.join(root, path)) as f:
            return list(json.load(f)[key])
    files = sorted(glob.glob(os.path.join(root, path)))
    if not files:
        raise ValueError(f"no JSON file matches {path}")
    rows = []
    for name in files:
        with open(name) as f:
            row = json.load(f)
        rows.append({**row, "file": os.path.basename(name)})
    return rows


def _matches(row: dict, key: str, value: str) -> bool:
    cell = row.get(key.strip())
    return cell is not None and str(cell) == value.strip()


def _table(root: str, path: str, spec: str) -> str:
    lines = [line for line in spec.strip("\n").splitlines() if line.strip()]
    header = [line for line in lines if line.startswith("|")]
    if len(header) != 2:
        raise ValueError(f"the table of {path} needs a header row and a row template")
    rows = _rows(root, path)
    for condition in _spec_lines(lines, "where"):
        key, value = condition.split("=", 1)
        rows = [r for r in rows if _matches(r, key, value)]
    labels = _spec_lines(lines, "label")
    if labels:
        rows = _labelled(rows, labels, path)
    pivots = _spec_lines(lines, "pivot")
    if pivots:
        rows = _pivoted(rows, pivots[0], path)
    columns = header[0].count("|") - 1
    out = [header[0], "|" + "---|" * columns]
    formatter = _Cells()
    for r in rows:
        line = formatter.format(header[1], **{k: _parse(v) for k, v in r.items()})
        out.append(line.replace(" ± -", "").replace("-–-", "-"))  # no spread, no interval
    return "\n".join(out)


def regenerate(text: str, root: str) -> str:
    """`text` with every generated part rebuilt from its file (paths relative to `root`)."""

    def include(m):
        with open(os.path.join(root, m["path"])) as f:
            content = f.read()
        if m["section"]:
            content = _section(content, m["section"], m["path"])
        return m.group(1) + content.strip("\n") + "\n" + m.group(5)

    def table(m):
        return m.group(1) + _table(root, m["path"], m["spec"]) + "\n" + m.group(5)

    return _TABLE.sub(table, _INCLUDE.sub(include, text))


def stale_parts(root: str) -> list[str]:
    """'DOC: path' for every generated part that differs from its file."""
    stale = []
    for name in DOCUMENTS:
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        for pattern in (_INCLUDE, _TABLE):
            for m in pattern.finditer(text):
                if regenerate(m.group(0), root) != m.group(0):
                    stale.append(f"{name}: {m['path']}")
    return stale


def main(argv):
    del argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _CHECK.value:
        stale = stale_parts(root)
        for part in stale:
            print(f"stale: {part} (python -m experiments.docs rewrites it)")
        sys.exit(1 if stale else 0)
    for name in DOCUMENTS:
        path = os.path.join(root, name)
        with open(path) as f:
            text = f.read()
        new = regenerate(text, root)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print(f"rewrote the generated parts of {name}")


if __name__ == "__main__":
    app.run(main)
