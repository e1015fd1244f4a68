import sys

from rtmdet.cli import main

sys.exit(main())
