"""Another version of one of refqwen's modules (a file from `git show <commit>:<path>`), loaded beside this
tree's so that a benchmark can alternate the two in one process (tools/bench_gemvs.py, bench_attention.py,
compare_decode.py)."""

import importlib.util
import sys


def module_from_file(path: str, name: str):
    """The module in the file at `path`, imported as `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Numba's cache finds the kernels' module by name
    spec.loader.exec_module(module)
    return module
