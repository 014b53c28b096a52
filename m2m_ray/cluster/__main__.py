"""``python -m m2m_ray.cluster [--strict] [--job CONFIG] PATH...``: see ``m2m_ray.cluster``."""

import sys

from m2m_ray.cluster import main

if __name__ == "__main__":
    sys.exit(main())
