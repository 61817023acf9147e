#!/usr/bin/env python3
"""Write the fixed perplexity corpus: sources every CPython 3.11 ships, concatenated in this order.

    python tools/ppl_corpus.py corpus.txt && refqwen ppl corpus.txt --window 1024

Order: json/__init__.py, json/decoder.py, json/encoder.py, json/scanner.py, json/tool.py,
textwrap.py, string.py (from the running interpreter's standard library), joined as is.
"""

import sys
from pathlib import Path

from refqwen.evaluate import CORPUS_FILES as FILES
from refqwen.evaluate import corpus_text

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus.txt")
    text = corpus_text()
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(text)} characters from {len(FILES)} files of Python {sys.version.split()[0]}")
