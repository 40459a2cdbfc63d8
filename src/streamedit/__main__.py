"""``python -m streamedit`` = the ``streamedit`` command."""

from streamedit.cli.group import main

main()
