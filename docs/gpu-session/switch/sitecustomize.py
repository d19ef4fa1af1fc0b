"""For a measuring session only: with this folder on PYTHONPATH, every Python process started (the bench's
workers included) sets the GIL's switch interval to $SWITCH_INTERVAL seconds (Python's default: 0.005).
See ../README.md, "Next to measure"."""
import os
import sys

if os.environ.get("SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["SWITCH_INTERVAL"]))
