"""Imports every command module so that each registers its command on the `mixq` group."""
# One line per command module; each module does `from .main import cli` and `@cli.command()`.
from . import quantize  # noqa: F401,E402
from . import inspect  # noqa: F401,E402
from . import plan  # noqa: F401,E402
from . import generate  # noqa: F401,E402
from . import chat  # noqa: F401,E402
from . import demo  # noqa: F401,E402
from . import eval  # noqa: F401,E402
