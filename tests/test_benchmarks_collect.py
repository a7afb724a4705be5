"""The results page is assembled from the per-benchmark tables, in a fixed order."""

import pytest

from benchmarks.collect_results import collect


def test_tables_are_ordered_and_their_headings_demoted(tmp_path):
    (tmp_path / "spectrum.md").write_text("# Spectrum\n\n| B | ms |\n| --- | --- |\n| 32 | 0.1 |\n")
    (tmp_path / "torch.md").write_text("# PyTorch\n\n## MLP\n\nrow\n")
    (tmp_path / "extra.md").write_text("# Extra\n")
    page = collect(tmp_path)
    assert page.index("## PyTorch") < page.index("## Spectrum") < page.index("## Extra")
    assert "### MLP" in page and "\n# PyTorch" not in page
    assert "| 32 | 0.1 |" in page


def test_empty_results_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result tables"):
        collect(tmp_path)
