import sys

from pgdurable.ops.cli import main

sys.exit(main())
