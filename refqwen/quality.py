"""What a quantization cost: a quantized checkpoint against its float32 source on the fixed corpus.

Perplexity of both and their relative difference, mean and max KL divergence of the next-token
distributions, and top-1 agreement (refqwen.evaluate.agreement), on the first `tokens` tokens of
refqwen.evaluate.corpus_text() in disjoint windows; plus the sizes on disk.
"""

import json
from pathlib import Path

from refqwen.errors import RefqwenError

REPORT_NAME = "quality_report.json"


def quality_report(source, quantized, scheme: str, backend: str = "numba-int8", tokens: int = 2048,
                   window: int = 512, progress: bool = True) -> dict:
    """Run the float32 source (reference backend) and the quantized checkpoint (`backend`) on the corpus."""
    import refqwen
    from refqwen.evaluate import agreement, corpus_text

    reference = refqwen.load(source, progress=progress)
    if reference.tokenizer is None:
        raise RefqwenError(f"--report: {source} has no tokenizer, so the corpus cannot be tokenized")
    ids = reference.tokenizer.encode(corpus_text())[:tokens]
    candidate = refqwen.load(quantized, backend=backend, progress=progress)
    result = agreement(reference, candidate, ids, window=window, progress=progress)
    return dict(scheme=scheme, source=str(reference.source), quantized=str(quantized), backend=backend,
                window=window, **result.to_dict(), size_bytes=size_on_disk(quantized),
                source_size_bytes=size_on_disk(reference.source))


def size_on_disk(path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size


def report_path(quantized) -> Path:
    """quality_report.json inside a checkpoint folder, or NAME.quality_report.json beside a .gguf."""
    quantized = Path(quantized)
    return quantized / REPORT_NAME if quantized.is_dir() else quantized.with_suffix(f".{REPORT_NAME}")


def write_report(report: dict, quantized) -> Path:
    path = report_path(quantized)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


def format_report(r: dict) -> str:
    mib = 1024 ** 2
    rows = [("scheme", r["scheme"]), ("tokens (window)", f"{r['tokens']} ({r['window']})"),
            ("perplexity float32", f"{r['ppl_reference']:.4f}"),
            ("perplexity quantized", f"{r['ppl_candidate']:.4f}"),
            ("relative difference", f"{r['ppl_relative_diff']:+.2%}"),
            ("mean KL (nats)", f"{r['mean_kl']:.5f}"), ("max KL (nats)", f"{r['max_kl']:.4f}"),
            ("top-1 agreement", f"{r['top1_agreement']:.2%}"),
            ("size on disk", f"{r['size_bytes'] / mib:.1f} MiB (source {r['source_size_bytes'] / mib:.1f} MiB)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
