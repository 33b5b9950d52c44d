#!/usr/bin/python
# Copyright: pagefusion contributors
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: page_fusion
short_description: Turn page fusion on or off for a libvirt domain
version_added: 0.1.0
description:
  - Sets the page-fusion element in the C(<metadata>) of a libvirt domain's persistent
    definition, C(<pagefusion:page-fusion state="on|off" group="NAME"/>), and keeps
    C(<memoryBacking><nosharepages/>) consistent with it (page fusion off means
    C(nosharepages), so that KSM never merges the domain's memory).
  - Page fusion can only be changed while the domain is shut off. A domain that is not
    shut off and needs a change makes the task fail, unless O(shutdown=true), with which the
    module shuts the domain down, changes the setting and starts the domain again.
  - Only the two elements change; the rest of the definition stays as it was.
author:
  - pagefusion contributors
options:
  name:
    description:
      - Name of the libvirt domain.
    type: str
    required: true
    aliases: [domain]
  state:
    description:
      - V(on) lets the kernel's KSM merge the domain's memory with that of other domains of
        the same group; V(off) keeps its memory out of merging.
      - YAML reads unquoted V(on) and V(off) as booleans; V(true), V(false) and the strings
        V(on), V(off) are all accepted.
    type: raw
    required: true
  group:
    description:
      - The page-fusion group of the domain. Domains are fused only with domains of the
        same group; domains without one share a default group.
      - 1 to 64 letters, digits, C(.), C(_) or C(-), starting with a letter or digit.
      - Leaving it out removes the group the domain had.
    type: str
  shutdown:
    description:
      - What to do with a domain that is not shut off and needs a change.
      - V(false) fails the task and changes nothing.
      - V(true) asks the guest to shut down, waits up to O(shutdown_timeout) seconds,
        changes the setting, and starts the domain again if it was running.
    type: bool
    default: false
  shutdown_timeout:
    description:
      - Seconds to wait for the guest to shut down after the request.
    type: int
    default: 120
  force:
    description:
      - With O(shutdown=true), destroy (power off) the domain when it has not shut down
        within O(shutdown_timeout) seconds, or when its guest cannot be asked to shut down.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - pagefusion.libvirt.pagefusion
attributes:
  check_mode:
    support: full
    details: A domain that would need a shutdown is reported, not shut down.
  diff_mode:
    support: full
    details: The diff shows the page-fusion element alone, before and after.
  platform:
    platforms: posix
seealso:
  - module: pagefusion.libvirt.page_fusion_info
"""

EXAMPLES = r"""
- name: Ensure page fusion is on for the web domains of a shut-off host
  pagefusion.libvirt.page_fusion:
    name: web-1
    state: "on"
    group: web
  vars:
    ansible_python_interpreter: /opt/pagefusion/venv/bin/python

- name: Ensure page fusion is off, shutting the domain down and starting it again if needed
  pagefusion.libvirt.page_fusion:
    name: db-1
    state: "off"
    shutdown: true
    shutdown_timeout: 300
    force: true
  vars:
    ansible_python_interpreter: "{{ pagefusion_host_python }}"

- name: Ensure page fusion is on for a domain of a remote libvirtd
  pagefusion.libvirt.page_fusion:
    name: build-7
    state: "on"
    uri: qemu+ssh://root@hv2.example.com/system
"""

RETURN = r"""
name:
  description: Name of the domain.
  returned: always
  type: str
  sample: web-1
page_fusion:
  description: The page-fusion setting of the domain's persistent definition after the task.
  returned: always
  type: dict
  contains:
    state:
      description: V(on) or V(off).
      type: str
    group:
      description: The page-fusion group, or null for none.
      type: str
  sample: {"state": "on", "group": "web"}
previous:
  description: The page-fusion setting before the task.
  returned: always
  type: dict
  sample: {"state": "off", "group": null}
domain_state:
  description: The state of the domain after the task, as libvirt names it.
  returned: always
  type: str
  sample: shut off
shutdown:
  description:
    - How the domain was stopped for the change.
    - V(none) when it was not stopped, V(graceful) when the guest shut down,
      V(destroyed) when it was powered off (O(force=true)).
  returned: always
  type: str
  sample: graceful
started:
  description: Whether the domain was started again after the change.
  returned: always
  type: bool
  sample: true
"""

import time

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.pagefusion.libvirt.plugins.module_utils import pagefusion_common as common

POLL_INTERVAL_S = 0.5


STATES = {True: "on", False: "off", "on": "on", "off": "off", "true": "on", "false": "off",
          "yes": "on", "no": "off"}  # fmt: skip


def desired_state(module) -> str:
    """``on`` or ``off`` from what the task gave, a YAML boolean included."""
    given = module.params["state"]
    state = STATES.get(given.lower() if isinstance(given, str) else given)
    if state is None:
        module.fail_json(msg=f"state {given!r} is not valid; use 'on' or 'off'")
    return state


def desired_value(module):
    """The PageFusion the task asks for, with the group checked."""
    group = module.params["group"]
    if group is not None:
        try:
            common.element.check_group(group)
        except common.PagefusionError as err:
            common.fail(module, err)
    return common.element.PageFusion(enabled=desired_state(module) == "on", group=group)


def fail_unchanged(module, result, msg: str) -> None:
    """Fail the task before any change: the result says what the domain still has."""
    result.update(changed=False, page_fusion=result["previous"])
    module.fail_json(msg=msg, **result)


def refuse_change_while_up(module, dom, value, result) -> None:
    """Fail the task: the domain is up and the task may not shut it down."""
    name = dom.name()
    fail_unchanged(
        module,
        result,
        f"domain {name!r} is {common.connection.state_name(dom)}: page fusion can only be"
        f" changed while the domain is shut off; set shutdown=true to shut it down, set"
        f" page fusion to {value.describe()} and start it again, or shut it down yourself",
    )


def shut_down(module, dom) -> str:
    """Stop the domain as the options say; return how ("graceful" or "destroyed")."""
    name = dom.name()
    timeout_s = module.params["shutdown_timeout"]
    force = module.params["force"]

    try:
        dom.shutdown()
    except common.libvirt.libvirtError as err:
        if not force:
            module.fail_json(
                msg=(
                    f"domain {name!r}: the guest cannot be asked to shut down"
                    f" ({err.get_error_message()}); set force=true to destroy it instead"
                )
            )
        module.warn(f"domain {name!r}: shutdown refused ({err.get_error_message()}); destroying")
        dom.destroy()
        return "destroyed"

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if common.connection.is_shut_off(dom):
            return "graceful"
        time.sleep(POLL_INTERVAL_S)

    if not force:
        module.fail_json(
            msg=(
                f"domain {name!r} is still {common.connection.state_name(dom)} {timeout_s} s after"
                " the shutdown request (the guest may still shut down later); raise"
                " shutdown_timeout, or set force=true to destroy it after the timeout"
            )
        )
    module.warn(f"domain {name!r} did not shut down within {timeout_s} s; destroying")
    dom.destroy()
    return "destroyed"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True, aliases=["domain"]),
            state=dict(type="raw", required=True),
            group=dict(type="str"),
            shutdown=dict(type="bool", default=False),
            shutdown_timeout=dict(type="int", default=120),
            force=dict(type="bool", default=False),
            **common.URI_OPTION,
        ),
        supports_check_mode=True,
    )
    common.check_imports(module)
    name = module.params["name"]
    value = desired_value(module)

    conn = common.connect(module)
    dom = common.lookup_domain(module, conn, name)
    try:
        current_xml = dom.XMLDesc(common.settings.INACTIVE_XML)
        before = common.settings.read(dom)
        new_xml, changed = common.domainxml.with_page_fusion(current_xml, value)
        after_element = common.element_xml(new_xml)
        before_element = common.element_xml(current_xml)
    except (common.PagefusionError, common.libvirt.libvirtError) as err:
        common.fail(module, err)

    result = dict(
        changed=changed,
        name=name,
        page_fusion=common.page_fusion_value(value if changed else before.persistent),
        previous=common.page_fusion_value(before.persistent),
        domain_state=before.state,
        shutdown="none",
        started=False,
    )
    if module._diff:
        header = f"{name}: <pagefusion:page-fusion>"
        result["diff"] = dict(
            before=before_element,
            after=after_element,
            before_header=header,
            after_header=header,
        )
    if not changed:
        if before.running_with is not None and before.running_with != value:
            module.warn(
                f"domain {name!r} is defined with page fusion {value.describe()} but runs with"
                f" {before.running_with.describe()} until it is started again"
            )
        module.exit_json(**result)
    if not dom.isPersistent():
        fail_unchanged(
            module,
            result,
            f"domain {name!r} is transient: page fusion lives in the persistent definition;"
            " define the domain (virsh define) before setting it",
        )
    was_active = not common.connection.is_shut_off(dom)
    if was_active and not module.params["shutdown"]:
        refuse_change_while_up(module, dom, value, result)
    if module.check_mode:
        module.exit_json(**result)

    try:
        if was_active:
            result["shutdown"] = shut_down(module, dom)
        try:
            common.settings.change(dom, value)
        finally:
            # A domain that was up is started again even when the change
            # failed: the task must not leave a guest down that it brought down.
            if was_active:
                dom.create()
                result["started"] = True
        result["domain_state"] = common.connection.state_name(dom)
    except (common.PagefusionError, common.libvirt.libvirtError) as err:
        common.fail(module, err, **result)

    module.exit_json(**result)


if __name__ == "__main__":
    main()
