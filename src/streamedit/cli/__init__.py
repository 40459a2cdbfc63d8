"""The ``streamedit`` command: ``group.py`` (lazy subcommands; user errors end in one line and exit 2),
``options.py`` (options shared by every command that loads a model), ``commands.py`` (stylize, info).
bench, eval, serve, live and train live with their mechanism and import ``cli.options``."""

from . import commands  # noqa: F401  (registers stylize and info on the group)
from .group import LAZY_COMMANDS, _Group, cli, main, setup_logging
from .options import (DTYPES, check_speed_flags, command_line, lllite_options, load, model_options,
                      resolve_device, speed_options, temporal_config)
