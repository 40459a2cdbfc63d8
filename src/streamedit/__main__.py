"""``python -m streamedit`` = the ``streamedit`` command."""

from streamedit.cli import main

main()
