"""`python -m dmssl COMMAND ...`: the same as the installed `dmssl` command."""

from dmssl.cli import console

raise SystemExit(console())
