"""Run `python -m moequant ...` with a different command line per rank (argv[1]: a JSON
list of argument lists, indexed by MLX_RANK, each starting with "-m moequant"): how the
tests make ranks disagree, as two hosts with different files or flags would."""

import json
import os
import sys

from moequant.cli import main

if __name__ == "__main__":
    argv = json.loads(sys.argv[1])[int(os.environ.get("MLX_RANK", "0"))]
    assert argv[:2] == ["-m", "moequant"], argv
    sys.exit(main(argv[2:]))
