"""``python -m mlflow_ptycho_flavor`` runs the ``ptycho-flavor`` command line."""

import sys

from .cli import main

sys.exit(main())
