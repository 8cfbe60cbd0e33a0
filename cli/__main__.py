"""``python -m geomprobe.cli``: the same as the ``geomprobe`` command (for scripts that run it with the
interpreter they are running under)."""

from .main import main

main()
