"""`python -m server [...]` starts the SuperLink; `python -m server connection ...` writes the
flwr CLI connection. See server/cli.py."""

import sys

from server.cli import main

sys.exit(main())
