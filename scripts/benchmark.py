#!/usr/bin/env python
"""Same as ``adamerge bench``: ``python scripts/benchmark.py [--model ViT-B-32] [-K 8] [-B 2]``."""

from adamerge.commands.bench import bench_main

if __name__ == "__main__":
    bench_main()
