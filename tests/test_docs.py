"""The documents' generated parts equal what their results files give (experiments/docs.py)."""

import os

from experiments import docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_generated_part_matches_its_results_file():
    assert docs.stale_parts(ROOT) == [], "run: python -m experiments.docs"


def test_a_results_file_changed_without_regenerating_is_caught(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "t.csv").write_text(
        "setting,loss,std\nnum_experts=0,1.5,\nnum_experts=8,1.25,0.01\n"
    )
    (tmp_path / "r" / "s.md").write_text("# S\n\n## Part\n\nkept text\n\n## Other\n\nnot this\n")
    doc = (
        "<!-- table: r/t.csv\n| experts | loss |\n| {setting!x} | {loss:.2f} ± {std:.2f} |\n-->\n"
        "<!-- end table -->\n\n<!-- include: r/s.md#Part -->\n<!-- end include -->\n"
    )
    (tmp_path / "EXPERIMENTS.md").write_text(docs.regenerate(doc, str(tmp_path)))
    text = (tmp_path / "EXPERIMENTS.md").read_text()
    assert "| dense | 1.50 |\n| 8 | 1.25 ± 0.01 |" in text and "kept text" in text
    assert "not this" not in text
    assert docs.stale_parts(str(tmp_path)) == []
    (tmp_path / "r" / "t.csv").write_text("setting,loss,std\nnum_experts=0,1.6,\n")
    assert docs.stale_parts(str(tmp_path)) == ["EXPERIMENTS.md: r/t.csv"]
    (tmp_path / "r" / "s.md").write_text("# S\n\n## Part\n\nnew text\n")
    assert sorted(docs.stale_parts(str(tmp_path))) == [
        "EXPERIMENTS.md: r/s.md",
        "EXPERIMENTS.md: r/t.csv",
    ]


def test_labels_pivots_and_json_rows_follow_their_files(tmp_path):
    """Labelled rows come in the label lines' order; a pivot's cells are the mean ± sample std of
    its values (checked against NumPy); JSON rows come from a glob of files or a file's list."""
    import numpy as np

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "by.csv").write_text(
        "setting,loss\nnum_experts=8,1.25\nnum_experts=0,1.5\nnum_experts=64,1.2\n"
    )
    evals = [(1, 0.5, 1.51), (1, 0.5, 1.55), (1, 2.0, 1.43), (1, 2.0, 1.44), (2, 0.5, 1.60)]
    (tmp_path / "r" / "ev.csv").write_text(
        "k,eval_cf,eval_loss\n" + "".join(f"{k},{cf},{v}\n" for k, cf, v in evals)
    )
    (tmp_path / "r" / "sizes").mkdir()
    for name, n in (("b.json", 2**31), ("a.json", 3 * 10**6)):
        (tmp_path / "r" / "sizes" / name).write_text(f'{{"bytes": {n}, "machine": {{"cpus": 2}}}}')
    (tmp_path / "r" / "rows.json").write_text('{"rows": [{"T": 64, "s": 0.5}, {"T": 128, "s": 2}]}')
    (tmp_path / "r" / "two.md").write_text("| a |\n|---|\n| 1 |\n\ntext\n\n| b |\n|---|\n| 2 |\n")
    doc = (
        "<!-- table: r/by.csv\n| model | loss |\n| {label} | {loss:.2f} |\n"
        "label: setting=num_experts=0 => dense\nlabel: setting=num_experts=64 => wide\n-->\n"
        "<!-- end table -->\n"
        "<!-- table: r/ev.csv\n| k | 0.5 | 2.0 |\n"
        "| {k} | {mean[0.5]:.3f} ± {std[0.5]:.3f} | {mean[2.0]:.3f} ± {std[2.0]:.4f} |\n"
        "pivot: rows=k columns=eval_cf value=eval_loss\n-->\n<!-- end table -->\n"
        "<!-- table: r/sizes/*.json\n| file | GiB | M | cpus |\n"
        "| {file} | {bytes!G:.2f} | {bytes!M:.1f} | {machine[cpus]} |\n-->\n<!-- end table -->\n"
        "<!-- table: r/rows.json#rows\n| T | s |\n| {T} | {s:.1f} |\n-->\n<!-- end table -->\n"
        "<!-- include: r/two.md#table 2 -->\n<!-- end include -->\n"
    )
    text = docs.regenerate(doc, str(tmp_path))
    assert "| dense | 1.50 |\n| wide | 1.20 |\n<!--" in text  # label order, unlabelled row gone
    a, b = [1.51, 1.55], [1.43, 1.44]
    row1 = (
        f"| 1 | {np.mean(a):.3f} ± {np.std(a, ddof=1):.3f} | "
        f"{np.mean(b):.3f} ± {np.std(b, ddof=1):.4f} |"
    )
    assert row1 in text
    assert "| 2 | 1.600 | - |" in text  # one value: no spread; no value: '-'
    assert "| a.json | 0.00 | 3.0 | 2 |\n| b.json | 2.00 | 2147.5 | 2 |" in text
    assert "| 64 | 0.5 |\n| 128 | 2.0 |" in text
    assert "| b |\n|---|\n| 2 |\n<!-- end include -->" in text and "| a |" not in text
