"""``python -m streamedit.cli`` = the ``streamedit`` command."""

from .group import main

main()
