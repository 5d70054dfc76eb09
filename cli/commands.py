"""Imports every command module so that each registers its command on the `mixq` group."""
# One line per command module; each module does `from .main import cli` and `@cli.command()`.
