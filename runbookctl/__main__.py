"""`python -m runbookctl`: the same as the `runbookctl` console script."""

from runbookctl.cli import main

main()
