"""The ``wsiseg`` command line: :mod:`.app` holds the Click group (``wsiseg``, the console script's
``wsiseg.cli.app:main``) and its commands, and :mod:`.pipeline` reads the versioned YAML job files that
``wsiseg run`` runs as the equivalent command line. The commands only parse options and call the library.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.cli.app (main), wsiseg.cli.pipeline
