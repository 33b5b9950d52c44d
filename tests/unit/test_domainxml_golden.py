"""pagefusion's writes change only its element and the merge setting.

Each case turns ``NAME.in.xml`` into ``CASE.out.xml`` (in tests/golden/domainxml);
the expected files were checked by reading their diff against the input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from pagefusion import domainxml, element
from pagefusion.element import PageFusion

GOLDEN = Path(__file__).parent.parent / "golden" / "domainxml"

CASES = {
    "plain-on": ("plain", PageFusion(enabled=True, group="lab")),
    "plain-off": ("plain", PageFusion()),
    "annotated-off": ("annotated", PageFusion()),
    "annotated-regroup": ("annotated", PageFusion(enabled=True, group="lab-2")),
    "isolated-on": ("isolated", PageFusion(enabled=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_edit_matches_golden_file(case):
    source, value = CASES[case]
    original = (GOLDEN / f"{source}.in.xml").read_text()

    edited, changed = domainxml.with_page_fusion(original, value)

    assert changed
    assert edited == (GOLDEN / f"{case}.out.xml").read_text()
    domain = element.parse_domain(edited)
    assert element.from_domain(domain) == value
    assert domainxml.consistent(domain)


def test_setting_the_value_a_domain_has_leaves_the_text_alone():
    original = (GOLDEN / "isolated.in.xml").read_text()
    edited, changed = domainxml.with_page_fusion(original, PageFusion())
    assert not changed
    assert edited is original


def test_unusual_layout_falls_back_to_a_correct_tree():
    # All on one line: the line splices cannot apply, the tree edit still does.
    original = "<domain type='qemu'><name>x</name><memory>1024</memory><!-- keep --></domain>"
    edited, changed = domainxml.with_page_fusion(original, PageFusion())

    assert changed
    domain = element.parse_domain(edited)
    assert element.from_domain(domain) == PageFusion()
    assert domainxml.merging_disabled(domain)
    assert "<!-- keep -->" in edited
    assert etree.fromstring(edited).findtext("memory") == "1024"


def test_removing_nosharepages_keeps_other_backing_settings():
    original = (GOLDEN / "annotated-off.out.xml").read_text()
    edited, _ = domainxml.with_page_fusion(original, PageFusion(enabled=True, group="lab"))
    domain = element.parse_domain(edited)
    assert domain.find("memoryBacking/hugepages") is not None
    assert not domainxml.merging_disabled(domain)
    assert edited == (GOLDEN / "annotated.in.xml").read_text()
