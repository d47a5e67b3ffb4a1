import sys

from ltsearch.cli import main

sys.exit(main())
