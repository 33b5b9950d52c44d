"""Stands in for pip's get-pip.py, which ansible-test fetches from a host of
its own to put pip into each sanity test's virtual environment: bootstrap pip
from the standard library's ensurepip, then install what ansible-test asked
for from the package index. get-pip.py's own options (--no-setuptools,
--no-wheel) are dropped, as ensurepip installs neither."""

import subprocess
import sys

args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"])
subprocess.check_call([sys.executable, "-m", "pip", "install", *args])
