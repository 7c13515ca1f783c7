import sys

from cospec.cli import main

sys.exit(main())
