"""``streamedit train base | pairs | lllite``: each subcommand lives with its mechanism."""

from __future__ import annotations

import click

from ..cli.group import _Group


class _TrainGroup(_Group):
    lazy = {"base": ("streamedit.train.base", "base_command"),
            "pairs": ("streamedit.train.pairs", "pairs_command"),
            "lllite": ("streamedit.train.lllite", "lllite_command")}


@click.group(cls=_TrainGroup)
def train_command():
    """Train the demo edit model, or a temporal LLLite adapter for any base model."""
