"""`python -m anytime`: the `anytime` command, for environments whose scripts folder is not on PATH."""

from anytime.cli import main

main()
