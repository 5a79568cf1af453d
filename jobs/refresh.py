"""spark-submit jobs/refresh.py [build options] --output-dir DIR: the scheduled, incremental corpus refresh.

The same options as etl/build_corpus.py; rebuilds only what changed in the source and prints one JSON line
last: {"version", "committed", "rebuilt", "removed", "unchanged", "content_hash", "samples_hash"}. See
jobs/README.md for the schedulers (Kubernetes CronJob, systemd timer, Airflow) that run it.
"""

from __future__ import annotations

import sys

from etl.build_corpus import refresh_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return refresh_main(argv, prog=prog or "jobs/refresh.py")


if __name__ == "__main__":
    sys.exit(main())
