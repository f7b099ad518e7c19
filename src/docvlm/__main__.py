import sys

from docvlm.cli import main

sys.exit(main())
