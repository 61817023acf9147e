"""`open_checkpoint`: one entry point for Hugging Face folders, GGUF files and the demo model."""

from pathlib import Path

from refqwen.checkpoint.demo import demo_path
from refqwen.checkpoint.gguf import load_gguf
from refqwen.checkpoint.hf import load_hf_folder
from refqwen.errors import RefqwenError


def open_checkpoint(path, progress: bool = True):
    """(path, config, weights read on demand, tokenizer or None) of a folder, a .gguf or "demo"."""
    if str(path) == "demo":
        path = demo_path(progress=progress)
    path = Path(path)
    if not path.exists():
        raise RefqwenError(f"{path}: no such file or folder; a model is a Hugging Face folder (config.json + "
                           f"safetensors), a .gguf file, or 'demo' (the embedded Qwen2.5-Coder-0.5B-Instruct)")
    if path.is_dir():
        return (path, *load_hf_folder(path))
    if path.suffix == ".gguf":
        return (path, *load_gguf(path))
    raise RefqwenError(f"{path}: not a model; expected a Hugging Face folder (config.json + safetensors), "
                       f"a .gguf file, or 'demo'")
