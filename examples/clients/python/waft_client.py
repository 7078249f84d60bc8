"""The Python client's command line, run from a source checkout without installing it.

The client is the package in clients/python (`pip install ./clients/python`, then `waft-py`
or `python3 -m waft_client`); this script runs the same command line from the checkout:

    python3 examples/clients/python/waft_client.py --endpoint 127.0.0.1:7001 submit kv 'put a 1'

Its stubs are generated from proto/ on first use into a cache directory (WAFT_PY_STUBS).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "clients", "python"))

from waft_client.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
