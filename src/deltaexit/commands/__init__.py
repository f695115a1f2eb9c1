"""Sub-commands of the ``deltaexit`` CLI, one module each (see :mod:`deltaexit.cli`)."""
