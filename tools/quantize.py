#!/usr/bin/env python3
"""Quantize a checkpoint to int8 or int4 (or a Q8_0 GGUF) and report what it cost.

    python tools/quantize.py SOURCE OUT --scheme int8-g32|int8-channel|int4-g32|int4-g128
                             [--keep embed,lm_head] [--report] [--force] [--gguf]

The same as `refqwen quantize`; the format is in docs/quantization.md.
"""

import sys

from refqwen.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
