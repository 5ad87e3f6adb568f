"""What each subcommand does, one module per command family, as `run_<command>(args)`; gatelab.cli.main
imports a module here only when its command runs, so these may import torch at module level."""
