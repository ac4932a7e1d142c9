import sys

from patchdiff.cli import main

sys.exit(main())
