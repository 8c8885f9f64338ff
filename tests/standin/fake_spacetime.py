"""Entry point of the SpacetimeDB stand-in: ``python fake_spacetime.py [spacetime CLI args…]``.

Normally run through ``tests/standin/bin/spacetime``; the package lives next to this file
(``fakestdb/``), which is on ``sys.path`` because Python puts the script's directory first.
"""

import sys

from fakestdb.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
