"""`python -m anytime.cli` (what torchrun runs: `torchrun ... -m anytime.cli train ...`)."""

from anytime.cli import main

main()
