import sys

from services.executor.server import main

sys.exit(main())
