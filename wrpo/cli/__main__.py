"""`python -m wrpo.cli` (what torchrun runs in the training pods)."""

from wrpo.cli.main import main

main()
