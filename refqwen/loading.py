"""`refqwen.load`: a checkpoint (refqwen/checkpoint/) made into a Model on the chosen backend."""

from tqdm import tqdm

from refqwen import backends
from refqwen.checkpoint.open import open_checkpoint
from refqwen.model import Model


def load(path, backend: str = "numpy", progress: bool = True) -> Model:
    """Load a model from a Hugging Face folder, a .gguf file, or "demo" (the embedded model)."""
    ops = backends.get(backend)  # fails early, before a long load, on an unknown backend
    path, cfg, weights, tokenizer = open_checkpoint(path, progress)
    ops.check_fits(cfg, str(path))  # a GPU backend says now, not after minutes of copying, if it cannot fit
    with tqdm(total=len(weights), desc=f"loading {path.name} ({backend})", unit="tensor", disable=not progress) as bar:
        weights.on_read = bar.update
        model = Model(cfg, weights, tokenizer=tokenizer, source=str(path), backend=ops)
    ops.warm_up()
    return model
