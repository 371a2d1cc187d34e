"""How many serving processes can share one mount: the one number every per-process structure of
the shared state is sized by (shared.py's layout, the file handle's column field, the records'
refcount words). Kept free of imports so that the CLI can check ``--workers`` without loading numpy.
"""

COLUMNS = 14  # column 0 is the parent (it serves until the fork), then one per forked worker
MAX_WORKERS = COLUMNS - 1
