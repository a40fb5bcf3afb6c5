import sys

from fastdebias.cli import main

sys.exit(main())
