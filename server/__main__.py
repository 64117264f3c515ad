"""`python -m server ...` is the `trident` command."""
from server.cli import main

raise SystemExit(main())
