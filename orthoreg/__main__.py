import sys

from orthoreg.cli import main

sys.exit(main())
