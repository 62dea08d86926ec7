"""``python -m bench``: see ``bench/__init__.py``."""

from bench.run import main

raise SystemExit(main())
