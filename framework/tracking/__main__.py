"""``python -m framework.tracking DIR ...``: the courier of a tracking directory (courier.py)."""

from framework.tracking.courier import main

main()
