"""``python -m simpletun``: the same as the ``simpletun`` command."""

import sys

from simpletun.cli import main

sys.exit(main())
