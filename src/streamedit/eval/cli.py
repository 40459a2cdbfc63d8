"""``streamedit eval``: the measuring run (``eval.run``, the default) and ``streamedit eval protocol``."""

from __future__ import annotations

import click

from ..cli.group import _Group

EVAL_COMMANDS = {"run": ("streamedit.eval.run", "eval_command"),
                 "protocol": ("streamedit.eval.protocol", "protocol_command")}


class _EvalGroup(_Group):
    """``streamedit eval --clips ...`` keeps meaning ``eval run``; ``eval protocol`` is the split-aware report."""

    lazy = EVAL_COMMANDS

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.lazy:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("eval", cls=_EvalGroup)
def eval_group():
    """Measure stylized clips (``eval [run]``), or run the train/tune/test protocol (``eval protocol``)."""
