"""`python -m shardstate ...` is the `shardstate` command."""

from shardstate.cli import main

raise SystemExit(main())
