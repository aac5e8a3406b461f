"""`pipeline` command line: a thin layer over the library functions (which the tests call directly).

Bad input raises pipeline.utils.UserError anywhere below; it is printed here as one line
("Error: ...") with exit status 2 and no traceback.
"""
from __future__ import annotations

import sys

import click

from .utils import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings=dict(help_option_names=["-h", "--help"], show_default=True))
@click.version_option(package_name="learned-ncm-pipeline")
def cli():
    """Learned-NCM long-tailed recognition: extract features (stage 1), fit heads (stage 2), report."""


# ---- stage 1 ----------------------------------------------------------------------------------------
# (the `extract` and `info` commands are defined in pipeline/cli_extract.py region below)

# ---- stage 2: fit-head ------------------------------------------------------------------------------

# ---- reports ----------------------------------------------------------------------------------------


def main(argv=None):
    cli.main(args=argv, prog_name="pipeline")


if __name__ == "__main__":
    sys.exit(main())
