"""`python -m services.cli ...` runs pipectl (the same as the `pipectl` script)."""

import sys

from services.cli.main import main

sys.exit(main())
