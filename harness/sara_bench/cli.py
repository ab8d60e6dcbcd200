"""``sara-bench``: the evidence benchmark's command line (also ``python -m sara_bench``).

    sara-bench --size smoke --out /tmp/smoke --docs /tmp/smoke-docs

Every flag is the benchmark's own (``sara-bench -h``).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from . import bench

    return bench.main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
