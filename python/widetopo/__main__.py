"""`python -m widetopo ...` runs the command line (same as the `widetopo` console script)."""
import sys

from widetopo.cli import main

if __name__ == "__main__":
    sys.exit(main())
