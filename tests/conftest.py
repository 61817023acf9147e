import numpy as np
import pytest
import torch
from oracle import build_hf_model

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


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def demo():
    """The embedded demo model, loaded by refqwen."""
    import refqwen

    return refqwen.load("demo", progress=False)


@pytest.fixture(scope="session")
def hf():
    """(tokenizer, model) of transformers loading the same demo GGUF, dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from refqwen.demo import demo_path

    path = demo_path(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return tokenizer, model.eval()
