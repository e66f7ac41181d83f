"""``llamagate``: the operator's command line (``llamagate --help`` lists the commands).

Each command is declared once, on its function (``registry.py``), in the module of its
group; ``main`` builds the parser from those declarations.
"""

# The groups in the order --help lists their commands: importing a group declares them.
from . import serving, accounts, inspection, reference  # noqa: F401, I001
from .registry import main

__all__ = ["main"]
