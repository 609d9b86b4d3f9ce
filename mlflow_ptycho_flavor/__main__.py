"""``python -m mlflow_ptycho_flavor`` runs the ``ptycho-flavor`` command line."""

import sys

from mlflow_ptycho_flavor.cli import main

sys.exit(main())
