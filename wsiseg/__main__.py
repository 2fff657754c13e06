"""``python -m wsiseg`` runs the CLI."""

from wsiseg.cli.app import main

main()
