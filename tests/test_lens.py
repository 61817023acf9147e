"""The logit lens and attention patterns, checked by value on tiny random models."""

import json

import numpy as np
import pytest
from oracle import random_weights, tiny_config
from safetensors.numpy import save_file

import refqwen
from refqwen.cli import main
from refqwen.lens import attention_pattern, lens_logits, logit_lens, plot_attention_pattern, plot_logit_lens
from refqwen.model.moe import softmax
from refqwen.model.norm import rms_norm

KINDS = ["dense-untied", "dense-tied", "dense-sliding", "moe-step1"]
IDS = [5, 17, 3, 99, 42, 7, 64, 1, 120, 33, 8]  # 11 tokens: longer than dense-sliding's window of 8


@pytest.fixture(scope="module")
def models():
    return {kind: refqwen.Model(tiny_config(kind), random_weights(tiny_config(kind))) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_last_stage_of_the_lens_is_the_models_prediction(models, kind):
    model = models[kind]
    lens = logit_lens(model, IDS, k=4)
    assert lens.stages == ["embed"] + [f"layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert lens.top_ids.shape == lens.top_probs.shape == (len(lens.stages), len(IDS), 4)
    logits = model.forward(IDS)  # [T, V]
    np.testing.assert_array_equal(lens.top_ids[-1], np.argsort(-logits, axis=-1, kind="stable")[:, :4])
    # the same float32 softmax of the same logits: equal to rounding of the two softmax implementations
    np.testing.assert_allclose(lens.top_probs[-1], np.take_along_axis(softmax(logits), lens.top_ids[-1], -1),
                               rtol=1e-6, atol=1e-7)
    resid = refqwen.trace(model, IDS, names=[f"layers.{model.config.num_hidden_layers - 1}.resid_post"])
    np.testing.assert_array_equal(lens_logits(model, next(iter(resid.values()))), logits)  # the same operations


@pytest.mark.parametrize("kind", ["dense-untied", "dense-tied"])
def test_every_stage_is_final_norm_then_lm_head_of_its_residual_stream(models, kind):
    """By hand: rms_norm with the final norm's weight, then x @ lm_headᵀ (the embedding when tied)."""
    model = models[kind]
    w = random_weights(model.config)
    lm_head = w["model.embed_tokens.weight"] if model.config.tie_word_embeddings else w["lm_head.weight"]
    lens = logit_lens(model, IDS, k=3)
    t = refqwen.trace(model, IDS, names=["embed", "layers.*.resid_post"])
    for stage, resid in enumerate(t.values()):
        logits = rms_norm(resid, w["model.norm.weight"], model.config.rms_norm_eps) @ lm_head.T  # [T, V]
        order = np.argsort(-logits, axis=-1, kind="stable")[:, :3]
        np.testing.assert_array_equal(lens.top_ids[stage], order)
    # the stages differ: the lens is not reading the same array five times
    assert len({tuple(lens.top_ids[s, :, 0]) for s in range(len(lens.stages))}) > 1
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 0)  # most probable first


@pytest.mark.parametrize("kind,layer", [("dense-untied", 0), ("dense-sliding", 3), ("moe-step1", 2)])
def test_pattern_is_the_softmax_of_scaled_masked_scores(models, kind, layer):
    """Rows sum to 1, and equal softmax(q_h k_{h//G}ᵀ / sqrt(D)) over the visible keys, computed here
    from the traced rotated queries and keys."""
    model = models[kind]
    cfg = model.config
    t = refqwen.trace(model, IDS, names=[f"layers.{layer}.attn.q_rot", f"layers.{layer}.attn.k_rot"])
    q, k = t[f"layers.{layer}.attn.q_rot"], t[f"layers.{layer}.attn.k_rot"]  # [T, H, D], [T, KV, D]
    window = cfg.window(layer)
    for head in range(cfg.num_attention_heads):
        pattern = attention_pattern(model, IDS, layer, head)  # [T, T]
        np.testing.assert_allclose(pattern.sum(axis=-1), 1, rtol=0, atol=1e-6)  # a float32 sum of <= 11 terms
        scores = q[:, head] @ k[:, head // cfg.kv_group_size].T / np.sqrt(cfg.head_dim)  # [T, T]
        i, j = np.arange(len(IDS))[:, None], np.arange(len(IDS))[None, :]
        visible = (j <= i) & ((i - j < window) if window else True)
        expected = softmax(np.where(visible, scores, -np.inf))
        # float32 scores summed in another order: a few ulps of values of magnitude ~10
        np.testing.assert_allclose(pattern, expected, rtol=0, atol=1e-6)
        assert np.all(pattern[~visible] == 0)
    if window:
        assert not visible.all(axis=None) and (~visible & (j <= i)).any()  # the window really cut keys off


def test_bad_layer_head_and_k_are_refused(models):
    model = models["dense-untied"]
    with pytest.raises(refqwen.RefqwenError, match="layer: expected 0 .. 3, got 4"):
        attention_pattern(model, IDS, 4, 0)
    with pytest.raises(refqwen.RefqwenError, match="head: expected a query head 0 .. 3, got -1"):
        attention_pattern(model, IDS, 0, -1)
    with pytest.raises(refqwen.RefqwenError, match="k: expected"):
        logit_lens(model, IDS, k=0)
    with pytest.raises(refqwen.RefqwenError, match="position: expected -11 .. 10"):
        logit_lens(model, IDS, k=2).table(position=11)


def test_pictures_are_pngs_of_the_right_size(models, tmp_path):
    model = models["dense-untied"]
    lens = logit_lens(model, IDS, k=2)
    path = plot_logit_lens(lens, tmp_path / "lens.png")
    pattern = attention_pattern(model, IDS, 1, 2)
    path2 = plot_attention_pattern(pattern, [str(i) for i in IDS], tmp_path / "pattern.png", "layer 1, head 2")
    for p in (path, path2):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 200
    assert sorted(f.name for f in tmp_path.iterdir()) == ["lens.png", "pattern.png"]  # no temporary left
    with pytest.raises(refqwen.RefqwenError, match="written as .png"):
        plot_logit_lens(lens, tmp_path / "lens.jpg")
    with pytest.raises(refqwen.RefqwenError, match="cannot write the picture"):
        plot_logit_lens(lens, tmp_path / "missing" / "lens.png")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = tiny_config("dense-untied")
    folder = tmp_path_factory.mktemp("tiny-lens")
    save_file(random_weights(cfg), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return folder


def test_commands_print_the_functions_values(models, tiny_folder, tmp_path, capsys):
    model = models["dense-untied"]
    ids = ",".join(map(str, IDS))
    assert main(["lens", "--model", str(tiny_folder), "--ids", ids, "--k", "2", "--position", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    lens = logit_lens(model, IDS, k=2)
    assert lines[0] == "logit lens at position 3 (after token '99'):"
    assert lines[-1].split()[:2] == ["layers.3", repr(str(lens.top_ids[-1, 3, 0]))]
    png = tmp_path / "p.png"
    assert main(["pattern", "--model", str(tiny_folder), "--ids", ids, "--layer", "2", "--head", "1",
                 "--png", str(png)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:1 + len(IDS)]
    printed = np.array([[float(w) for w in row.split()[1:]] for row in rows])
    np.testing.assert_allclose(printed, attention_pattern(model, IDS, 2, 1), rtol=0, atol=0.005)  # 2 decimals
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["pattern", "--model", str(tiny_folder), "--ids", ids, "--layer", "9", "--head", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "refqwen: error: layer: expected 0 .. 3, got 9"
    assert main(["lens", "--model", str(tiny_folder)]) == 2
    assert "lens: give exactly one of --prompt TEXT or --ids" in capsys.readouterr().err


def test_top_k_orders_like_a_stable_sort_even_on_ties():
    from refqwen.lens import _top_k

    rng = np.random.default_rng(0)
    for _ in range(100):
        logits = rng.integers(0, 4, (3, 12)).astype(np.float32)  # many exact ties
        k = int(rng.integers(1, 13))
        np.testing.assert_array_equal(_top_k(logits, k), np.argsort(-logits, axis=-1, kind="stable")[:, :k])
