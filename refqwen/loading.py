"""`refqwen.load`: a checkpoint (refqwen/checkpoint/) made into a Model on the chosen backend."""

from dataclasses import replace

from tqdm import tqdm

from refqwen import backends
from refqwen.checkpoint.open import open_checkpoint
from refqwen.model import Model
from refqwen.model.config import dual_chunk_attention as dca_config
from refqwen.model.config import with_rope_scaling

KEEP = object()  # rope_scaling default: as the checkpoint says


def load(path, backend: str = "numpy", progress: bool = True, rope_scaling=KEEP, dual_chunk_attention=KEEP) -> Model:
    """Load a model from a Hugging Face folder, a .gguf file, or "demo" (the embedded model).

    rope_scaling overrides the checkpoint's rotary scaling, as the Qwen2 model cards tell users
    to edit config.json: {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    (the original defaults to the checkpoint's max_position_embeddings), or None for plain rotary.
    dual_chunk_attention turns Dual Chunk Attention on for any model (refqwen/model/dca.py):
    {"chunk_size": 32768, "local_size": 4096, "original_max_position_embeddings": 32768}, or None off.
    """
    ops = backends.get(backend)  # fails early, before a long load, on an unknown backend
    path, cfg, weights, tokenizer = open_model(path, progress, rope_scaling, dual_chunk_attention)
    ops.check_fits(cfg, str(path))  # a GPU backend says now, not after minutes of copying, if it cannot fit
    with tqdm(total=len(weights), desc=f"loading {path.name} ({backend})", unit="tensor", disable=not progress) as bar:
        weights.on_read = bar.update
        model = Model(cfg, weights, tokenizer=tokenizer, source=str(path), backend=ops)
    ops.warm_up(model)
    return model


def open_model(path, progress: bool = True, rope_scaling=KEEP, dual_chunk_attention=KEEP):
    """(path, config with load()'s overrides applied, weights read on demand, tokenizer or None): the
    checkpoint's names and shapes checked against its config, no weight read yet (`refqwen info`)."""
    path, cfg, weights, tokenizer = open_checkpoint(path, progress)
    if rope_scaling is not KEEP:
        cfg = with_rope_scaling(cfg, rope_scaling)
    if dual_chunk_attention is not KEEP:
        cfg = replace(cfg, dual_chunk_attention=dca_config(dual_chunk_attention, "dual_chunk_attention override"))
    return path, cfg, weights, tokenizer
