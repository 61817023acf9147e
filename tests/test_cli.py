"""The refqwen command as a user runs it: end to end through subprocesses (load included), and the
commands' own logic in this process on the session's demo model (cli_on_demo)."""

import io
import json
import subprocess
import sys

import pytest

from refqwen import cli


def refqwen(*args, stdin=None, check=True):
    done = subprocess.run([sys.executable, "-m", "refqwen.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_generate_streams_the_same_text_as_the_api(demo):
    out = refqwen("generate", "def add(a, b):", "--max-new-tokens", "12").stdout
    assert out == demo.generate("def add(a, b):", max_new_tokens=12) + "\n"


@pytest.fixture
def cli_on_demo(demo, monkeypatch, capsys):
    """refqwen's main() in this process on the session's demo model: the command's own logic (flags,
    the chat loop, output) without a 15 s load per test; the load itself is run by the subprocess tests."""

    def run(*args, stdin=""):
        monkeypatch.setattr(cli, "_load", lambda parsed: demo)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        assert cli.main(list(args)) == 0
        return capsys.readouterr().out

    return run


def test_generate_chat_with_sampling_flags(demo, cli_on_demo):
    args = ["--max-new-tokens", "10", "--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]
    out = cli_on_demo("generate", "Name a planet.", "--chat", *args)
    expected = demo.generate([{"role": "user", "content": "Name a planet."}], max_new_tokens=10, temperature=0.8,
                             top_p=0.9, seed=5)
    assert out == expected + "\n"


def test_chat_through_a_pipe(demo, cli_on_demo):
    turns = "What is 2+2? Answer with a number.\n/reset\nWhat is 3+3? Answer with a number.\n/exit\nignored\n"
    lines = cli_on_demo("chat", "--max-new-tokens", "8", stdin=turns).splitlines()
    first = demo.generate([{"role": "user", "content": "What is 2+2? Answer with a number."}], max_new_tokens=8)
    second = demo.generate([{"role": "user", "content": "What is 3+3? Answer with a number."}], max_new_tokens=8)
    assert lines == [*first.splitlines(), "(conversation reset)", *second.splitlines()]


def test_chat_keeps_history(demo, cli_on_demo):
    turns = "My name is Ada.\nWhat is my name?\n"  # ends with EOF, like Ctrl-D
    out = cli_on_demo("chat", "--max-new-tokens", "12", stdin=turns)
    first = demo.generate([{"role": "user", "content": "My name is Ada."}], max_new_tokens=12)
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is my name?"}]
    assert out == first + "\n" + demo.generate(history, max_new_tokens=12) + "\n"


def test_info_json():
    # a subprocess: info reads the config and the tensors' shapes, no weight (a few seconds for the demo)
    report = json.loads(refqwen("info", "--json", "--context", "4096").stdout)
    assert report["config"]["hidden_size"] == 896
    assert report["parameters"]["total"] == 630_167_424  # untied: embedding and lm_head both counted
    assert report["memory"]["kv_cache_gib"] == pytest.approx(2 * 24 * 4096 * 2 * 64 * 4 / 2**30)
    # int8-g32: a byte per weight and a float32 scale per 32 (every matrix here has inputs a multiple of 32);
    # norms and biases float32; the same KV cache; 2 GiB of workspace
    matrices = 630_167_424 - 24 * (2 * 896 + 896 + 2 * 128) - 896  # all but the norms and biases
    expected = matrices * (1 + 4 / 32) + 4 * (630_167_424 - matrices) + 2 * 24 * 4096 * 2 * 64 * 4 + 2 * 2**30
    assert report["memory"]["gpu_gib"]["cupy"] == pytest.approx(expected / 2**30)
    assert report["memory"]["gpu_gib"]["cupy-f16"] == pytest.approx((expected + matrices * (1 - 4 / 32)) / 2**30)


def test_info_reads_no_weight(monkeypatch, capsys):
    from refqwen.checkpoint.weights import LazyWeights

    def refuse(self, name):
        raise AssertionError(f"info read {name}")

    monkeypatch.setattr(LazyWeights, "__getitem__", refuse)
    assert cli.main(["info", "--yarn", "4"]) == 0
    assert "rope_scaling" in capsys.readouterr().out


def test_ppl(tmp_path, cli_on_demo):
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    report = json.loads(cli_on_demo("ppl", str(tmp_path / "text.txt"), "--window", "32"))
    assert report["tokens"] > 40 and report["perplexity"] > 1 and report["window"] == 32


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--backend", "nope"], "unknown backend 'nope'; available: numpy"),
    (["generate", "hi", "--model", "/no/such/model"], "no such file or folder"),
    (["ppl", "/no/such/file.txt"], "/no/such/file.txt: no such file"),
])
def test_errors_are_messages_not_tracebacks(args, message):
    done = refqwen(*args, check=False)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
