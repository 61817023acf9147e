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
