"""The ``wsiseg`` command line: :mod:`.app` holds the Click group (``wsiseg``, the console script's
``wsiseg.cli.app:main``) and registers the commands, one module per command group: :mod:`.slides` (info,
convert), :mod:`.segment` (segment, demo), :mod:`.train`, :mod:`.evaluate` and :mod:`.bench`, with the option types
they share in :mod:`.options`. :mod:`.pipeline` reads the versioned YAML job files that ``wsiseg run`` runs as the
equivalent command line. The commands only parse options and call the library.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.cli.app (main), .pipeline, .segment, ...
