"""`python -m pipeline.profile_guard GENERATED ASKED`: the first command of every dvc.yaml stage.

dvc.yaml lists one profile's jobs (its seeds, its launcher: torchrun on 8 GPUs for the paper profile), so
`dvc exp run -S profile=OTHER` must not run them. This stops the stage before anything runs, saying what to do. A
module of its own, importing nothing of the package: it runs before every stage and costs a Python start only. In
Python rather than in shell: DVC runs a stage's commands with the user's $SHELL, which need not be a POSIX one.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    generated, asked = argv
    if generated == asked:
        return 0
    print(f"dvc.yaml lists the jobs of profile {generated}, not {asked}: run python -m pipeline dvc-yaml --profile "
          f"{asked} first", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
