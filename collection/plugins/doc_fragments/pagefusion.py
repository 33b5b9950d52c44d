# Copyright: pagefusion contributors
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""Documentation shared by the modules of pagefusion.libvirt."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  uri:
    description:
      - The libvirt connection URI of the host's QEMU driver.
    type: str
    default: qemu:///system
requirements:
  - The C(pagefusion) package and C(libvirt-python), in the python that runs the module.
notes:
  - The module imports the C(pagefusion) package, which the role C(pagefusion.libvirt.host)
    installs in a virtual environment (by default C(/opt/pagefusion/venv)). Run the task with
    C(ansible_python_interpreter) set to that environment's python, for example through the
    play variable C(pagefusion_host_python).
"""
