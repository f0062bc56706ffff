import sys

from fastchat_core.serve import main

sys.exit(main())
