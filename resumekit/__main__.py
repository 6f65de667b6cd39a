import sys

from resumekit.cli import main

sys.exit(main())
