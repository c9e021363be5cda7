"""The documents' generated parts equal what their results files give (experiments/docs.py)."""

import os

from experiments import docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_generated_part_matches_its_results_file():
    assert docs.stale_parts(ROOT) == [], "run: python -m experiments.docs"


def test_a_results_file_changed_without_regenerating_is_caught(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "t.csv").write_text("setting,loss,std\nnum_experts=0,1.5,\nnum_experts=8,1.25,0.01\n")
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
    assert sorted(docs.stale_parts(str(tmp_path))) == ["EXPERIMENTS.md: r/s.md", "EXPERIMENTS.md: r/t.csv"]
