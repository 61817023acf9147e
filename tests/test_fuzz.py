"""A short run of the fuzzers (tools/fuzz.py) over the seed corpus in tests/fuzz/corpus: a few seconds
per target, so that a regression any seed or its near mutations trigger fails CI. Longer runs: docs/security.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 8  # per target: 3 targets stay well under a minute with the start-up


@pytest.mark.parametrize("target", ["gguf", "safetensors", "template"])
def test_short_fuzz_run_finds_nothing(target, tmp_path):
    pytest.importorskip("atheris", reason="atheris is in the test extra; it has wheels for CPython 3.8-3.11 only")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz.py"), target, "--seconds", str(SECONDS),
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    executions = int(done.stdout.split(": ", 1)[1].split()[0])
    assert executions > 100, done.stdout  # it really ran
