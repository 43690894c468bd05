import sys

from dpseg.cli import main

sys.exit(main())
