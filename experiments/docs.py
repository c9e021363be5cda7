"""Regenerate the parts of README.md, EXPERIMENTS.md and BENCHMARKS.md that come from results files.

  python -m experiments.docs            # rewrite every generated part from its file
  python -m experiments.docs --check    # exit 1, naming each part, if any differs (a test runs it)

A generated part sits between two HTML comments, which Markdown does not render:

  <!-- include: experiments/results/diagnosis/diagnosis_summary.md -->
  ... the file's text, or with `#Heading` after the path the text of its `## Heading` section
  <!-- end include -->

  <!-- table: experiments/results/expert_count_top2/results_by_setting.csv
  | experts | eval loss (nats) |
  | {setting} | {eval_loss_mean:.4f} ± {eval_loss_std:.4f} |
  where: seeds=3
  -->
  ... one Markdown row per CSV row, from the row template (Python format fields named by the
  CSV's columns; an empty cell formats as '-' whatever its format spec, and ' ± -' is dropped;
  `{setting!x}` is a setting's expert count, `{setting!g}` its granularity); optional `where:` lines keep the rows whose column
  equals the value
  <!-- end table -->

So a number in these documents is either prose about a table or a table produced from the file
its marker names; a results file that changes without the document being regenerated fails the
suite (tests/test_docs.py).
"""

from __future__ import annotations

import csv
import os
import re
import string
import sys

from absl import app, flags

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
        if conversion == "g":
            m = re.search(r"granularity=(\d+)", str(value))
            return None if m is None else int(m[1])
        return super().convert_field(value, conversion)


def _parse(cell: str):
    if cell in ("", "None"):
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def _table(root: str, path: str, spec: str) -> str:
    lines = [line for line in spec.strip("\n").splitlines() if line.strip()]
    header = [line for line in lines if line.startswith("|")]
    where = [line.split(":", 1)[1].strip() for line in lines if line.startswith("where:")]
    if len(header) != 2:
        raise ValueError(f"the table of {path} needs a header row and a row template")
    with open(os.path.join(root, path)) as f:
        rows = list(csv.DictReader(f))
    for condition in where:
        key, value = condition.split("=", 1)
        rows = [r for r in rows if r.get(key.strip()) == value.strip()]
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
