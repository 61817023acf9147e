"""compare: the first divergence is where a run was changed; transformers' traces match refqwen's."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import CONFIGS, LOGITS_ATOL, build_hf_model, random_weights, tiny_config

import refqwen
from refqwen import RefqwenError, Trace, cli, compare, hf_trace, trace
from refqwen.hf_trace import trace_transformers
from refqwen.model.ops import Backend
from refqwen.trace import point_names

PERTURB_KINDS = ["dense-untied", "moe-step2-mlp-only"]
MODELS = {kind: refqwen.Model(tiny_config(kind), random_weights(tiny_config(kind))) for kind in PERTURB_KINDS}
IDS = np.random.default_rng(7).integers(0, 128, 12)
CLEAN = {kind: trace(model, IDS) for kind, model in MODELS.items()}
POINTS = [(kind, name) for kind in PERTURB_KINDS for name in CLEAN[kind]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(point=st.sampled_from(POINTS), where=st.integers(0, 10**6))
def test_a_perturbed_point_is_the_first_divergence(point, where):
    kind, name = point
    index = np.unravel_index(where % CLEAN[kind][name].size, CLEAN[kind][name].shape)

    def perturb(n, value):
        value = value.copy()
        if np.issubdtype(value.dtype, np.integer):  # moe.chosen: another expert
            value[index] = (value[index] + 1) % MODELS[kind].config.num_experts
        else:
            value[index] += 0.01
        return value

    report = compare(trace(MODELS[kind], IDS, hooks={name: perturb}), CLEAN[kind])
    first = report.first_divergence
    assert first is not None and first.name == name
    assert tuple(first.worst) == tuple(int(i) for i in index) and first.position == index[0]
    assert all(p.max_abs == 0 for p in report.points[:report.points.index(first)])


def interleaved_rotary(x, cos, sin):
    """The classic porting bug: llama2.c's pairs (2i, 2i+1) instead of Qwen2's (i, i + D/2)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # [T, heads, D/2, 2]
    rotated = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class InterleavedRotary(Backend):
    def apply_rotary(self, x, cos, sin):
        return interleaved_rotary(x, cos, sin)


@settings(max_examples=4, deadline=None)
@given(layer=st.integers(0, 3))
def test_a_bug_planted_in_a_copy_of_one_layer_is_found(layer):
    model = MODELS["dense-untied"]
    buggy = copy.copy(model)
    buggy.layers = list(model.layers)
    buggy.layers[layer] = copy.copy(model.layers[layer])
    buggy.layers[layer].attn = copy.copy(model.layers[layer].attn)
    buggy.layers[layer].attn.ops = InterleavedRotary()
    report = compare(trace(buggy, IDS), CLEAN["dense-untied"])
    assert report.first_divergence.name == f"layers.{layer}.attn.q_rot"
    assert not report.ok and "first divergence: layers." in str(report)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformers_traces_match(kind, tiny_hf, rng):
    hf, folder = tiny_hf(kind)
    model = refqwen.load(folder, progress=False)
    ids = rng.integers(0, 128, 40)
    ours, theirs = trace(model, ids), trace_transformers(hf, ids)
    assert list(theirs) == list(ours) == [n for n in point_names(model.config) if "pattern" not in n]
    report = compare(ours, theirs)  # atol 1e-4 + rtol 1e-4 at every point
    assert report.ok, str(report)
    # the oracle's logits tolerance (tests/oracle.py) applies to the logits; the residual stream grows to ~30
    # by the last layer, where float32 summation-order differences reach ~1e-4 absolute (~4e-6 relative)
    assert next(p for p in report.points if p.name == "logits").max_abs < LOGITS_ATOL


def test_transformers_attention_pattern_under_eager_attention(rng):
    hf = build_hf_model("dense-sliding")
    hf.set_attn_implementation("eager")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = refqwen.load(folder, progress=False)
    ids = rng.integers(0, 128, 30)
    report = compare(trace(model, ids, "*.pattern"), trace_transformers(hf, ids, "*.pattern"))
    assert [p.name for p in report.points] == [f"layers.{i}.attn.pattern" for i in range(4)] and report.ok


def test_report_table_json_and_mismatches():
    a = Trace({"embed": np.zeros((2, 3)), "logits": np.array([[1.0, np.nan]]), "extra": np.ones(1)},
              {"backend": "mine"})
    b = Trace.from_dict({"logits": torch.tensor([[1.0, 2.0]]), "embed": np.zeros((3, 3)), "other": np.ones(1)})
    report = compare(a, b)
    assert [p.name for p in report.points] == ["embed", "logits"]  # forward order, not b's order
    assert report.first_divergence.name == "embed" and report.first_divergence.note == "shape [2, 3] vs [3, 3]"
    assert report.points[1].exceeded and report.points[1].max_abs == np.inf  # NaN against a number
    assert report.only_in_a == ["extra"] and report.only_in_b == ["other"]
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["first_divergence"] == "embed" and data["points"][1]["max_abs"] == "inf"
    text = str(report)
    assert "EXCEEDS" in text and "only in a (1): extra" in text and "first divergence: embed" in text
    with pytest.raises(RefqwenError, match="share no trace point"):
        compare({"a": np.ones(1)}, {"b": np.ones(1)})


def test_tolerances():
    b = {"x": np.array([10.0, 0.0, -1.0])}
    a = {"x": np.array([10.01, 0.0, -1.0])}
    assert not compare(a, b, atol=1e-4, rtol=0).ok
    assert compare(a, b, atol=0, rtol=2e-3).ok
    p = compare(a, b).points[0]
    assert p.max_abs == pytest.approx(0.01) and p.max_rel == pytest.approx(1e-3) and p.worst == [0]


def refqwen_cli(*args):
    return subprocess.run([sys.executable, "-m", "refqwen.cli", "compare", *args], capture_output=True, text=True,
                          timeout=600, check=False)


def test_cli_exit_status(tiny_hf, tmp_path, capsys):
    folder = str(tiny_hf("moe-step1")[1])
    done = refqwen_cli("--model", folder, "--ids", "1,2,3,4", "--against", "numpy", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    assert "all 99 trace points within tolerance" in done.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    # the rest in this process: a subprocess importing transformers takes ~10 s
    capsys.readouterr()
    assert cli.main(["compare", "--model", folder, "--ids", "1,2,3,4", "--against", "transformers", "--atol", "0",
                     "--rtol", "0", "--names", "layers.3.*", "--names", "logits"]) == 1
    assert "first divergence: layers.3." in capsys.readouterr().out
    for args, message in [(["--names", "layers.7.*", "--ids", "1"], "'layers.7.*' matches no trace point"),
                          (["--prompt", "hi"], "has no tokenizer; give token ids with --ids"),
                          (["--ids", "1,x"], "--ids: expected comma-separated token ids"),
                          (["--ids", "1", "--against", "nope"], "unknown backend 'nope'")]:
        capsys.readouterr()
        assert cli.main(["compare", "--model", folder, *args]) == 2
        last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after a progress bar, if loading began
        assert last.startswith("refqwen: error: ") and message in last, last


def test_cli_demo_against_transformers(demo, hf, tmp_path, monkeypatch, capsys):
    # in this process, on the session's demo and transformers models (each load is a minute in a
    # subprocess; the loads themselves: the subprocess tests above and the `hf` fixture)
    monkeypatch.setattr(cli, "_load", lambda args: demo)
    monkeypatch.setattr(hf_trace, "load_transformers", lambda source: hf[1] if source == demo.source else None)
    status = cli.main(["compare", "--against", "transformers", "--prompt", "def fib(n):", "--names", "layers.2*.*",
                       "--names", "logits", "--json", str(tmp_path / "r.json")])
    assert status == 0, capsys.readouterr().out[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["a"]["ids"] == demo.tokenizer.encode("def fib(n):") and report["b"]["backend"] == "transformers"
    points = [p["name"] for p in report["points"]]
    assert points[-1] == "logits" and len(points) == 5 * 16 + 1  # layers 2, 20-23
