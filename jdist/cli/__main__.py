import sys

from jdist.cli import main

sys.exit(main())
