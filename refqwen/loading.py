"""`refqwen.load`: one entry point for Hugging Face folders, GGUF files and the demo model."""

from pathlib import Path

from tqdm import tqdm

from refqwen.errors import RefqwenError
from refqwen.model import Model


def load(path, backend: str = "numpy", progress: bool = True) -> Model:
    """Load a model from a Hugging Face folder, a .gguf file, or "demo" (the embedded model)."""
    from refqwen import backends

    ops = backends.get(backend)  # fails early, before a long load, on an unknown backend
    if str(path) == "demo":
        from refqwen.demo import demo_path

        path = demo_path(progress=progress)
    path = Path(path)
    if not path.exists():
        raise RefqwenError(f"{path}: no such file or folder; a model is a Hugging Face folder (config.json + "
                           f"safetensors), a .gguf file, or 'demo' (the embedded Qwen2.5-Coder-0.5B-Instruct)")
    if path.is_dir():
        from refqwen.hf_checkpoint import load_hf_folder

        cfg, weights, tokenizer = load_hf_folder(path)
    elif path.suffix == ".gguf":
        from refqwen.gguf_checkpoint import load_gguf

        cfg, weights, tokenizer = load_gguf(path)
    else:
        raise RefqwenError(f"{path}: not a model; expected a Hugging Face folder (config.json + safetensors), "
                           f"a .gguf file, or 'demo'")
    with tqdm(total=len(weights), desc=f"loading {path.name} ({backend})", unit="tensor", disable=not progress) as bar:
        weights.on_read = bar.update
        return Model(cfg, weights, tokenizer=tokenizer, source=str(path), backend=ops)
