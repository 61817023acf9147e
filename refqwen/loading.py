"""`refqwen.load`: one entry point for Hugging Face folders, GGUF files and the demo model."""

from pathlib import Path

from tqdm import tqdm

from refqwen.errors import RefqwenError
from refqwen.model import Model


def open_checkpoint(path, progress: bool = True):
    """(path, config, weights read on demand, tokenizer or None) of a folder, a .gguf or "demo"."""
    if str(path) == "demo":
        from refqwen.demo import demo_path

        path = demo_path(progress=progress)
    path = Path(path)
    if not path.exists():
        raise RefqwenError(f"{path}: no such file or folder; a model is a Hugging Face folder (config.json + "
                           f"safetensors), a .gguf file, or 'demo' (the embedded Qwen2.5-Coder-0.5B-Instruct)")
    if path.is_dir():
        from refqwen.hf_checkpoint import load_hf_folder

        return (path, *load_hf_folder(path))
    if path.suffix == ".gguf":
        from refqwen.gguf_checkpoint import load_gguf

        return (path, *load_gguf(path))
    raise RefqwenError(f"{path}: not a model; expected a Hugging Face folder (config.json + safetensors), "
                       f"a .gguf file, or 'demo'")


def load(path, backend: str = "numpy", progress: bool = True) -> Model:
    """Load a model from a Hugging Face folder, a .gguf file, or "demo" (the embedded model)."""
    from refqwen import backends

    ops = backends.get(backend)  # fails early, before a long load, on an unknown backend
    path, cfg, weights, tokenizer = open_checkpoint(path, progress)
    ops.check_fits(cfg, str(path))  # a GPU backend says now, not after minutes of copying, if it cannot fit
    with tqdm(total=len(weights), desc=f"loading {path.name} ({backend})", unit="tensor", disable=not progress) as bar:
        weights.on_read = bar.update
        model = Model(cfg, weights, tokenizer=tokenizer, source=str(path), backend=ops)
    ops.warm_up()
    return model
