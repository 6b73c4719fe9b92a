#!/usr/bin/env python
"""Command-line entry point: `python run_eval.py [run|report|list|generate|bench|doctor] ...` (no logic here;
see harness/cli.py). Without arguments it runs the quick suite on the bundled model and prints its report."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
