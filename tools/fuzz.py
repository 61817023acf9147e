"""Coverage-guided fuzzing (atheris, libFuzzer for Python) of what refqwen reads from untrusted files:

    python tools/fuzz.py gguf --seconds 60         # the GGUF reader: bytes -> refqwen.load(file.gguf)
    python tools/fuzz.py safetensors --seconds 60  # the folder loader: bytes -> model.safetensors of a tiny config
    python tools/fuzz.py template --seconds 60     # the chat template renderer: template text + messages
    python tools/fuzz.py all --seconds 20          # each target in turn

Every input must load (or render) or raise RefqwenError; any other exception, a load slower than
--timeout seconds, or an address space above --memory-mib is a finding: libFuzzer stops and writes the
input to crash-*/timeout-* in the current folder. Seeds come from tests/fuzz/corpus/TARGET; new
interesting inputs go to --work (a temporary folder unless given), so the repository is never written.
Arguments after `--` go to libFuzzer (e.g. `-- -jobs=2 -workers=2`). See docs/security.md.
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
TARGETS = ("gguf", "safetensors", "template")
TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}


def fuzz_one(target: str, seconds: int, timeout: int, memory_mib: int, work: Path, extra: list[str]) -> dict:
    """Run one target in this process (atheris takes over sys.argv and never returns)."""
    import atheris

    with atheris.instrument_imports(include=["refqwen", "gguf", "jinja2"]):
        import refqwen  # noqa: F401  (instrumented for coverage)
        from refqwen.chat_template import render_chat_template
        from refqwen.errors import RefqwenError
        from refqwen.loading import load

    scratch = Path(tempfile.mkdtemp(prefix=f"refqwen-fuzz-{target}-"))
    (scratch / "model").mkdir()
    (scratch / "model" / "config.json").write_text(__import__("json").dumps(TINY))

    def gguf(data: bytes):
        path = scratch / "m.gguf"
        path.write_bytes(data)
        model = load(path, progress=False)
        if model.tokenizer is not None:  # the vocabulary, merges and template the file brings, in use
            model.tokenizer.decode(model.tokenizer.encode("abc a <|im_end|>"))
            if model.tokenizer.chat_template:
                model.tokenizer.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=True)

    def safetensors(data: bytes):
        (scratch / "model" / "model.safetensors").write_bytes(data)
        load(scratch / "model", progress=False)

    def template(data: bytes):
        """TEMPLATE \\0 MESSAGE \\0 MESSAGE ...: a message's first byte picks its role, the rest is its content."""
        text, *raw_messages = data.split(b"\0")
        roles = ["user", "system", "assistant", "tool", None]
        messages = [{"role": roles[m[0] % len(roles)], "content": m[1:].decode("utf-8", "replace")}
                    for m in raw_messages[:8] if m]
        render_chat_template(text.decode("utf-8", "replace"), messages, len(data) % 2 == 0, bos_token="<s>",
                             eos_token="</s>")

    run = {"gguf": gguf, "safetensors": safetensors, "template": template}[target]

    def one_input(data: bytes):
        try:
            run(data)
        except RefqwenError:
            pass

    resource.setrlimit(resource.RLIMIT_AS, (memory_mib * 1024 ** 2,) * 2)
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(work), str(CORPUS / target), f"-max_total_time={seconds}", f"-timeout={timeout}",
            "-rss_limit_mb=0", "-print_final_stats=1", *extra]  # memory: RLIMIT_AS above (MemoryError = finding)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (a hang is a finding)")
    parser.add_argument("--memory-mib", type=int, default=4096, help="address-space limit (RLIMIT_AS)")
    parser.add_argument("--work", type=Path, help="folder for the inputs found (default: a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    work = args.work or Path(tempfile.mkdtemp(prefix="refqwen-fuzz-work-"))
    if args.child:
        fuzz_one(args.target, args.seconds, args.timeout, args.memory_mib, work / args.target, extra)
        return 0
    failed = False
    for target in TARGETS if args.target == "all" else (args.target,):
        cmd = [sys.executable, __file__, target, "--child", "--seconds", str(args.seconds), "--timeout",
               str(args.timeout), "--memory-mib", str(args.memory_mib), "--work", str(work), *extra]
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
        print(f"{target}: {summary(done.stderr, time.monotonic() - start)}", flush=True)
        if done.returncode != 0:
            failed = True
            print(done.stderr[-4000:], file=sys.stderr)
    return 1 if failed else 0


def summary(log: str, seconds: float) -> str:
    """Executions, time and coverage from libFuzzer's final statistics."""
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    edges, features = cov[-1] if cov else ("?", "?")
    return (f"{stats.get('number_of_executed_units', '?')} executions in {seconds:.0f} s "
            f"({stats.get('average_exec_per_sec', '?')}/s), coverage {edges} edges / {features} features, "
            f"{stats.get('new_units_added', '?')} new inputs, peak RSS {stats.get('peak_rss_mb', '?')} MB")


if __name__ == "__main__":
    sys.exit(main())
