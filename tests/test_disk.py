"""markerlab/disk.py: the free-space check before big writes, on the real file system."""

import pytest

from markerlab.disk import check_free_space, format_bytes, free_bytes
from markerlab.errors import UserError


def test_format_bytes():
    assert format_bytes(15.2e9) == "15.2 GB" and format_bytes(3_100_000_000) == "3.1 GB"
    assert format_bytes(340e6) == "340.0 MB" and format_bytes(999) == "999 B" and format_bytes(2e12) == "2.0 TB"


def test_need_vs_have_in_one_line(tmp_path):
    target = tmp_path / "runs" / "x" / "merged"   # need not exist yet: its nearest existing parent decides
    free = free_bytes(target)
    assert free == free_bytes(tmp_path) > 0
    assert check_free_space(target, 1) == free
    with pytest.raises(UserError) as err:
        check_free_space(target, free + 10**12, hint="free space or move run.out_dir")
    msg = str(err.value)
    assert msg.startswith(f"{target}: needs {format_bytes(free + 10**12)}, ") and " free; free space or" in msg
    assert "\n" not in msg
