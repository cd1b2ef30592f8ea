import sys

from launchers.cli import main

sys.exit(main())
