import numpy as np
import pytest
import torch
from gguf_writer import without_vocabulary
from oracle import TINY_MOE, build_hf_model, random_weights

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """kind -> (transformers model, folder it was saved to), built once per session."""
    built = {}

    def get(kind):
        if kind not in built:
            model = build_hf_model(kind)
            folder = tmp_path_factory.mktemp(kind)
            model.save_pretrained(folder)
            built[kind] = (model, folder)
        return built[kind]

    return get


# An MoE config whose every input size is a multiple of 128, so that every quantization scheme applies
WIDE = dict(TINY_MOE, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
            shared_expert_intermediate_size=128, num_experts=3, num_hidden_layers=2, decoder_sparse_step=2,
            tie_word_embeddings=False, architectures=["Qwen2MoeForCausalLM"])


@pytest.fixture(scope="session")
def wide_source(tmp_path_factory):
    """A float32 MoE folder (layer 0 dense, layer 1 sparse) with the WIDE config."""
    import json

    from safetensors.numpy import save_file

    from refqwen import Config

    cfg = Config.from_hf_dict(WIDE)
    folder = tmp_path_factory.mktemp("wide")
    save_file(random_weights(cfg), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return folder


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def demo():
    """The embedded demo model, loaded by refqwen."""
    import refqwen

    return refqwen.load("demo", progress=False)


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """(tokenizer, model) of transformers loading the same demo GGUF, dequantized to float32, as
    `refqwen compare --against transformers` loads it (hf_trace.load_transformers), once per session.
    The model is read from a copy without the vocabulary (gguf_writer.without_vocabulary: the same keys
    and tensors, 40 s less); the tokenizer from the file itself."""
    from transformers import AutoTokenizer

    from refqwen.checkpoint.demo import demo_path
    from refqwen.hf_trace import load_transformers

    path = demo_path(progress=False)
    copy = tmp_path_factory.mktemp("demo-without-vocabulary") / path.name
    without_vocabulary(path, copy)
    model = load_transformers(copy)
    copy.unlink()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), model
