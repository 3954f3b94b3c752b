import sys

from boltzflow.cli import main

sys.exit(main())
