"""``python -m ilora_kernels.crab`` = ``ilora-crab``."""

import sys

from .cli import main

sys.exit(main())
