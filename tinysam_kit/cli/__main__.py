import sys

from tinysam_kit.cli import main

sys.exit(main())
