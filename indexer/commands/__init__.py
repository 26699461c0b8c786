"""The `paperindex` commands, one module per group of them; `indexer/cli.py` parses the command line
and hands each to its `cmd_*` function."""
