"""``python -m exchange.cli``: the same as the ``zonex`` script."""

from exchange.cli import main

main()
