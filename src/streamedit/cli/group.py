"""Command line: ``streamedit stylize | info | bench | eval | serve | live | train``.

Every user mistake ends in one line on stderr and exit code 2; Ctrl-C / SIGTERM end any command
with one line and exit code 130 (during start-up too); during ``stylize`` they leave a finalized,
playable file with every frame processed so far.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

import click

from ..errors import StreameditError

# Commands that live with their mechanism, imported on first use (they import this module).
LAZY_COMMANDS = {"bench": ("streamedit.bench", "bench_command"), "eval": ("streamedit.eval.cli", "eval_group"),
                 "serve": ("streamedit.serve", "serve_command"), "live": ("streamedit.serve", "live_command"),
                 "train": ("streamedit.train.cli", "train_command")}


class _Group(click.Group):
    """Lazy subcommands; StreameditError (and unexpected errors) become one line + exit 2, no traceback."""

    lazy = LAZY_COMMANDS

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name]
            with signals_held():  # these modules import torch
                return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StreameditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (main) where no command said more: one line, 130
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug, not a user error: still one line unless asked for more
            if SIGNALLED:  # a library turned the interrupt into another error (an import cut short, say)
                click.echo("\ninterrupted", err=True)
                sys.exit(130)
            if os.environ.get("STREAMEDIT_DEBUG"):
                raise
            click.echo(f"error: {type(exc).__name__}: {exc} (set STREAMEDIT_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show library warnings and debug logs.")
def cli(verbose: bool):
    """Real-time video stylization with an instruction-edit diffusion model."""
    with signals_held():
        import torch  # noqa: F401  (every command needs it; setup_logging imports it anyway)

        setup_logging(verbose)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    if not verbose:
        for name in ("diffusers", "transformers", "httpx", "huggingface_hub", "torch", "PIL"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()


SIGNALLED: list[int] = []  # signals main() turned into KeyboardInterrupt: any error after one is the interrupt's


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held back (blocked in this thread) until the block ends, then delivered. Why: torch's
    import calls Python from C++ (pybind11, e.g. autograd's init); a KeyboardInterrupt raised there cannot
    unwind through C++ and aborts the process (SIGABRT, exit 134, seen about once in 100 interrupts sent
    during start-up). Held, the interrupt is raised right after the import, in our code."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _sigterm_to_interrupt(signum, frame):
    """SIGINT and SIGTERM: a KeyboardInterrupt, remembered (a library may catch it and raise something else)."""
    SIGNALLED.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM as Ctrl-C from the start (model loading included): one line and exit 130, not a silent death
    # (_Group.invoke prints it; this module imports no torch, so that covers every slow import too)
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    signal.signal(signal.SIGINT, _sigterm_to_interrupt)
    try:
        cli(prog_name="streamedit")
    except SystemExit as exc:
        if exc.code == 130 and SIGNALLED:  # everything is finalized and said: leave with exactly 130
            # (CPython 3.11 would re-raise SIGINT at exit where the interrupt passed through PyRun_String code)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        raise

