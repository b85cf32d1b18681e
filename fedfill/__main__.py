"""`python -m fedfill ...` is the `fedfill` command."""

import sys

from fedfill.cli import main

sys.exit(main())
