"""``python -m wsiseg`` runs the CLI."""

from wsiseg.cli import main

main()
