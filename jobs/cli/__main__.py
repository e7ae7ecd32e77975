"""``python -m jobs.cli``: the same as the ``nrm-ood`` console script."""

from jobs.cli import main

main()
