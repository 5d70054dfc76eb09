"""`mixq`: the command line. A thin click layer: each command lives in its own module and formats what the
library returns; errors users can cause become one line on stderr and exit code 1."""

import logging
import sys

import click

from .chat import chat
from .demo import demo
from .eval import eval_
from .generate import generate
from .inspect import inspect
from .plan import plan
from .quantize import quantize
from .serve import serve


class MixqGroup(click.Group):
    """Turns library errors (ValueError, OSError and friends) into one line and exit 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (ValueError, OSError, RuntimeError) as e:
            if ctx.params.get("verbose"):  # -v: the traceback too, for bug reports
                raise
            click.echo(f"mixq: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=MixqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="mixtral-quant")
def cli(verbose):
    """mixtral-quant: quantize Mixtral's attention and experts to NF4/int8 and run it on one GPU.

    \b
    Typical use:
      mixq quantize mistralai/Mixtral-8x7B-v0.1 -o mixtral-nf4   # ~25 GB NF4 checkpoint
      mixq inspect mixtral-nf4                                  # what is in it
      mixq plan mistralai/Mixtral-8x7B-v0.1 --gpu-memory 40GB     # will it fit?
      mixq chat mixtral-nf4                                     # talk to it
      mixq demo                                                 # everything, on the tiny embedded model
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# Every command, registered here and nowhere else: one line each.
cli.add_command(quantize)
cli.add_command(inspect)
cli.add_command(plan)
cli.add_command(generate)
cli.add_command(chat)
cli.add_command(demo)
cli.add_command(eval_)
cli.add_command(serve)


def main():
    cli()
