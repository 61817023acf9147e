"""backends.drop_stale_numba_cache: Numba's disk cache checks only the file a function is defined in, so the
backends' cache is dropped whole whenever any of their sources changed since it was written."""

import os

from refqwen.backends import drop_stale_numba_cache, sources_stamp


def cache_files(folder):
    return sorted(p.name for p in (folder / "__pycache__").iterdir())


def test_the_cache_goes_when_any_source_changes_and_stays_otherwise(tmp_path):
    (tmp_path / "kernel.py").write_text("def f(): pass\n")
    (tmp_path / "intrinsics.py").write_text("X = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    for name in ("kernel.f-1.py311.nbi", "kernel.f-1.py311.1.nbc", "kernel.cpython-311.pyc"):
        (cache / name).write_text("")
    drop_stale_numba_cache(tmp_path)  # no stamp yet: written by whom, for what sources, is unknown
    assert cache_files(tmp_path) == ["kernel.cpython-311.pyc", "numba-sources.stamp"]
    (cache / "kernel.f-1.py311.nbi").write_text("")
    drop_stale_numba_cache(tmp_path)  # nothing changed: the cache stays
    assert "kernel.f-1.py311.nbi" in cache_files(tmp_path)
    stamp = (cache / "numba-sources.stamp").read_text()
    (tmp_path / "intrinsics.py").write_text("X = 2\n")  # a callee's file, same size
    os.utime(tmp_path / "intrinsics.py", ns=(1, 1))
    drop_stale_numba_cache(tmp_path)
    assert cache_files(tmp_path) == ["kernel.cpython-311.pyc", "numba-sources.stamp"]
    assert (cache / "numba-sources.stamp").read_text() != stamp


def test_the_stamp_of_this_checkout_matches_its_cache():
    from refqwen import backends

    marker = backends.SOURCES / "__pycache__" / "numba-sources.stamp"
    if os.access(backends.SOURCES, os.W_OK):
        assert marker.read_text() == sources_stamp()
