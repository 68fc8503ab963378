import sys

from cxrfl.cli import main

sys.exit(main())
