"""`python -m shardstate.server.cli ...` is the `shardstate` command."""

from shardstate.server.cli import main

raise SystemExit(main())
