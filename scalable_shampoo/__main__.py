"""``python -m scalable_shampoo``: the command-line program."""

from .cli import main

raise SystemExit(main())
