import sys

from em.eval.compare import main

if __name__ == "__main__":
    sys.exit(main())
