"""``python -m wasmshare.cli``: the same command line as the ``wasmshare`` script."""

from . import main

main()
