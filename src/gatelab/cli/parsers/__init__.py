"""The subcommands' arguments, one module per command family; light (no torch), so that --help answers fast.

Each parser stores the command that runs it as `run`, "module:function" in gatelab.cli.commands, which the
dispatcher (gatelab.cli.main) imports only when the command runs.
"""
