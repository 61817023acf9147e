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
