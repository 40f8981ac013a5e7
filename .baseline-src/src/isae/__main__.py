"""``python -m isae`` is the ``isae`` console script."""

import sys

from isae.cli.main import main

sys.exit(main())
