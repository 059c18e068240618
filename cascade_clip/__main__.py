"""``python -m cascade_clip ...``: the ``cascade-clip`` command without the console script on the PATH."""

from .cli import main

if __name__ == "__main__":
    main()
