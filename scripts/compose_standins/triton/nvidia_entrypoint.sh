#!/bin/bash
# As NVIDIA's: run the command it is given, or a shell.
set -e
if [ $# -eq 0 ]; then exec /bin/bash; fi
exec "$@"
