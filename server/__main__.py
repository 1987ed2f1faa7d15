"""`python -m server` runs the keybinder CLI."""

from server.cli import main

main()
