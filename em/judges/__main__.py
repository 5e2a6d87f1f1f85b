import sys

from em.eval.compare import main

sys.exit(main())
