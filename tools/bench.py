#!/usr/bin/env python3
"""Benchmark refqwen against transformers float32 on the same machine in the same run.

    python tools/bench.py [--model demo] [--prompt-tokens 512] [--decode-tokens 32] [--repeats 2]

The same as `refqwen bench`; see refqwen/bench.py for how it measures.
"""

import sys

from refqwen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
