"""segpipe.io: atomic writes."""
import os

import pytest

from segpipe.io import write_text


def test_atomic_writes_get_the_mode_of_an_ordinary_write(tmp_path):
    write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode == os.stat(tmp_path / "b.txt").st_mode


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from segpipe.io import atomic_path

    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
