"""refqwen bench's own measurements: bytes a decode step reads, the bandwidth probe, the report."""

import numpy as np
from oracle import random_weights, tiny_config

from refqwen import backends, bench
from refqwen.model.model import Model


def test_weight_bytes_per_token_counts_every_projection_once():
    cfg = tiny_config("dense-untied")
    model = Model(cfg, random_weights(cfg), backend=backends.get("numba-int8"))
    C, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    per_layer = [(q_out, C), (kv_out, C), (kv_out, C), (C, q_out), (I, C), (I, C), (C, I)]
    expected = sum(o * i + o * -(-i // 32) * 4 for o, i in per_layer) * cfg.num_hidden_layers  # int8 + scales
    expected += V * C + V * -(-C // 32) * 4  # lm_head
    assert bench.weight_bytes_per_token(model) == expected


def test_bandwidth_probe_sums_rows():
    a = np.arange(3 * 4096, dtype=np.float32).reshape(3, 4096) % 7
    out = np.empty(3, np.float32)
    bench._row_sums(a, out)
    assert np.array_equal(out, a.sum(axis=1))
    assert bench.probe_bandwidth(2**22, passes=1) > 0


def test_report_states_decode_against_the_roofline(capsys):
    run = dict(engine="numba-int8", jit_s=0.1, load_s=1.0, prefill_tok_s=100.0, decode_tok_s=20.0, peak_rss_gib=1.0,
               first_steps_ms=[60.0, 50.0], later_step_ms_median=50.0, decode_of_roofline=0.5, repeat=0)
    bench.print_report(dict(model="demo", prompt_tokens=8, decode_tokens=4, cpus=2, read_gb_s_by_repeat={0: 30.0},
                            runs=[run], attention_peak_mib_by_T={}), "none")
    out = capsys.readouterr().out
    assert "50%" in out and "60 50 (50.0)" in out and "{0: 30.0}" in out


def test_gguf_bytes_per_token_counts_matrices_from_the_tensor_table():
    import gguf

    from refqwen.checkpoint.gguf import open_gguf

    path = "tests/fuzz/corpus/gguf/tiny.gguf"
    tensors = open_gguf(path).tensors
    names = {t.name for t in tensors}
    expected = 0
    for t in tensors:  # bytes from element counts and the type's block size, not the reader's n_bytes
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        block, size = gguf.GGML_QUANT_SIZES[t.qtype]
        expected += int(np.prod(t.shape)) // block * size
    assert expected > 0 and bench.gguf_bytes_per_token(path) == expected


def test_llama_cpp_needs_an_interpreter_that_has_it(tmp_path):
    import pytest

    from refqwen.errors import RefqwenError

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(RefqwenError, match="cannot import llama_cpp.*--llama-cpp-python"):
        bench.llama_cpp_engines(["tests/fuzz/corpus/gguf/tiny.gguf"], str(python))
    with pytest.raises(RefqwenError, match="--llama-cpp-python .*missing: cannot run it"):
        bench.llama_cpp_engines(["tests/fuzz/corpus/gguf/tiny.gguf"], str(tmp_path / "missing"))


def test_llama_cpp_runs_beside_refqwen_with_ratios_and_roofline(tmp_path, capsys):
    """The llama.cpp child replaced by a script that answers as bench_llama_cpp.py does: the engine is run with
    the given file and sizes, gets the file's bytes per token and a roofline share, and can be the baseline."""
    import json

    gguf_file = "tests/fuzz/corpus/gguf/tiny.gguf"
    python = tmp_path / "python"
    answer = dict(engine="llama.cpp:tiny", jit_s=None, load_s=0.1, prefill_tok_s=200.0, decode_tok_s=40.0,
                  first_steps_ms=[25.0], later_step_ms_median=25.0, weight_bytes_per_token=None, peak_rss_gib=0.5)
    python.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\necho '{json.dumps(answer)}'\n")
    python.chmod(0o755)
    report = bench.run_bench("demo", 8, 2, "llama.cpp:tiny", [], 1, str(tmp_path / "report.json"), [gguf_file],
                             str(python))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "-c import llama_cpp" and calls[1].endswith(f"bench_llama_cpp.py {gguf_file} 8 2")
    (run,) = report["runs"]
    assert run["weight_bytes_per_token"] == bench.gguf_bytes_per_token(gguf_file)
    roofline = report["read_gb_s_by_repeat"][0] * 1e9 / run["weight_bytes_per_token"]
    assert run["decode_of_roofline"] == round(40.0 / roofline, 3)
    assert "llama.cpp:tiny" in capsys.readouterr().out
