import os
import sys

# Test helpers (oracles, fixtures) live next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
