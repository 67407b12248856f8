import sys

from energyc.cli import main

sys.exit(main())
