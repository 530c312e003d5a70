"""`python -m appliance` is the `mcp-appliance` command."""

from appliance.cli import main

raise SystemExit(main())
