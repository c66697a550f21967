import sys

from skt.cli import main

sys.exit(main())
