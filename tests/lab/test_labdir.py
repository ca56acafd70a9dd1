"""Where a lab lives, and what `xenha lab` is willing to remove."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenha.lab.labdir import LabDir, ProgressWriter, default_lab_dir


def test_the_default_lab_dir_is_never_under_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENHA_LAB_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert not default_lab_dir().is_relative_to(Path.home())


def test_xenha_lab_dir_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XENHA_LAB_DIR", str(tmp_path / "lab"))
    assert default_lab_dir() == tmp_path / "lab"


def test_only_a_lab_dir_or_an_empty_one_may_be_removed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "stack.json").write_text("{}")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("...")
    assert LabDir(tmp_path / "empty").looks_like_a_lab()
    assert LabDir(tmp_path / "lab").looks_like_a_lab()
    assert not LabDir(tmp_path / "precious").looks_like_a_lab()


def test_progress_is_read_back_whole_lines_at_a_time(tmp_path: Path) -> None:
    lab = LabDir(tmp_path)
    write = ProgressWriter(lab.progress_file)
    write("control plane", "...")
    records, offset = lab.progress()
    assert [r["step"] for r in records] == ["control plane"]
    with lab.progress_file.open("a") as handle:
        handle.write('{"step": "half a li')
    write_more, offset_after = lab.progress(offset)
    assert (write_more, offset_after) == ([], offset)
