#!/usr/bin/python
# Copyright: pagefusion contributors
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: page_fusion_info
short_description: Read page-fusion settings and fused-memory figures of a libvirt host
version_added: 0.1.0
description:
  - Returns the page-fusion setting of every domain of the host, shut-off domains included,
    and the host's fused-memory figures in VirtualBox's names.
  - C(RAM/VMM/Shared) is the memory that page fusion saves on the host, in bytes;
    C(Guest/RAM/Usage/Shared) is the fused memory of one running domain, in bytes. Both are
    read from the kernel's KSM counters. Other figures pagefusion reports are passed through
    as they are.
  - Changes nothing.
author:
  - pagefusion contributors
options:
  names:
    description:
      - Report only the domains with these names. All domains when left out.
    type: list
    elements: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - pagefusion.libvirt.pagefusion
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
    details: The module changes nothing, so there is nothing to diff.
  platform:
    platforms: posix
seealso:
  - module: pagefusion.libvirt.page_fusion
"""

EXAMPLES = r"""
- name: Read the host's page-fusion settings and figures
  pagefusion.libvirt.page_fusion_info:
  register: fusion
  vars:
    ansible_python_interpreter: /opt/pagefusion/venv/bin/python

- name: Show the memory page fusion saves on the host
  ansible.builtin.debug:
    msg: "{{ (fusion.metrics.host['RAM/VMM/Shared'] / 1048576) | round(1) }} MiB"
"""

RETURN = r"""
domains:
  description:
    - The page-fusion setting of every domain, in name order.
    - A domain whose page-fusion element is invalid has only C(name), C(uuid) and C(error).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Name of the domain.
      type: str
    uuid:
      description: UUID of the domain.
      type: str
    state:
      description: State of the domain, as libvirt names it.
      type: str
      sample: running
    page_fusion:
      description: The setting of the persistent definition, C(state) and C(group).
      type: dict
      sample: {"state": "on", "group": "web"}
    running_with:
      description: The setting the domain was started with; null when it is not running.
      type: dict
    merging_disabled:
      description: Whether the definition has C(<memoryBacking><nosharepages/>).
      type: bool
    error:
      description: Why the setting could not be read.
      type: str
  sample:
    - name: web-1
      uuid: 6b1f2a7e-8d0c-4c53-9a7e-0f3c2b9d1e44
      state: running
      page_fusion: {"state": "on", "group": "web"}
      running_with: {"state": "on", "group": "web"}
      merging_disabled: false
metrics:
  description: The host's fused-memory figures, as pagefusion reports them.
  returned: always
  type: dict
  contains:
    host:
      description:
        - Figures of the whole host; C(RAM/VMM/Shared) in bytes, C(ksm) the kernel's KSM
          counters and tunables.
      type: dict
      sample: {"RAM/VMM/Shared": 176685056, "ksm": {"pages_sharing": 43136, "run": 1}}
    domains:
      description:
        - Figures of each running domain that pagefusion's hook knows; each has C(name),
          C(uuid), C(page_fusion), C(group) and C(Guest/RAM/Usage/Shared) in bytes.
      type: list
      elements: dict
      sample:
        - {"name": "web-1", "uuid": "6b1f2a7e-8d0c-4c53-9a7e-0f3c2b9d1e44",
           "page_fusion": "on", "group": "web", "Guest/RAM/Usage/Shared": 73400320}
version:
  description: Version of the pagefusion package on the host.
  returned: always
  type: str
  sample: 0.1.0
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pagefusion.libvirt.plugins.module_utils import pagefusion_common as common


def main():
    module = AnsibleModule(
        argument_spec=dict(
            names=dict(type="list", elements="str"),
            **common.URI_OPTION,
        ),
        supports_check_mode=True,
    )
    common.check_imports(module)
    names = module.params["names"]

    conn = common.connect(module)
    try:
        domains = common.all_settings(conn, names)
        figures = common.host_metrics(names)
    except (common.PagefusionError, common.libvirt.libvirtError) as err:
        common.fail(module, err)

    module.exit_json(
        changed=False,
        domains=domains,
        metrics=figures,
        version=common.pagefusion_version(),
    )


if __name__ == "__main__":
    main()
