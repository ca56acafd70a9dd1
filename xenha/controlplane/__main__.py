import sys

from xenha.controlplane.cli import controlplane_main

sys.exit(controlplane_main(sys.argv[1:]))
