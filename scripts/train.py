#!/usr/bin/env python
"""Same entry point as the ``adamerge`` command: ``python scripts/train.py fit --config FILE``."""

import sys

from adamerge.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
