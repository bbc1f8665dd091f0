import sys

from services.tokenizer.server import main

sys.exit(main())
