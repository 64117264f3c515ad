"""`python -m trident.server ...` is the `trident` command."""
from trident.server.cli import main

raise SystemExit(main())
