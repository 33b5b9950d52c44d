"""Parsing and validating the page-fusion element, with one-line reasons."""

from __future__ import annotations

import pytest

from pagefusion import element
from pagefusion.element import NAMESPACE, STAMP_NAMESPACE, PageFusion
from pagefusion.errors import ElementError


def domain(metadata: str, name: str = "vm1") -> str:
    return f"<domain><name>{name}</name><metadata>{metadata}</metadata></domain>"


def value_of(xml: str) -> PageFusion:
    return element.from_domain(element.parse_domain(xml))


def test_absent_element_means_off():
    assert value_of("<domain><name>a</name></domain>") == PageFusion()
    assert value_of(domain("")) == PageFusion()


def test_on_with_group():
    xml = domain(f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on" group="lab.1"/>')
    assert value_of(xml) == PageFusion(enabled=True, group="lab.1")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (f'<p:page-fusion xmlns:p="{NAMESPACE}" state="maybe"/>', "'maybe' is not valid"),
        (f'<p:page-fusion xmlns:p="{NAMESPACE}"/>', "no 'state' attribute"),
        (
            f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on"/>'
            f'<p:page-fusion xmlns:p="{NAMESPACE}" state="off"/>',
            "appears 2 times",
        ),
        ('<q:page-fusion xmlns:q="http://example.org/other" state="on"/>', "is not pagefusion's"),
        ('<page-fusion state="on"/>', "'no namespace' is not pagefusion's"),
        (f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on" group="{"g" * 65}"/>', "1 to 64"),
        (f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on" group="a b"/>', "invalid page-fusion"),
        (
            f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on" group="x&#9;y"/>',
            "invalid page-fusion",
        ),
        (f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on" size="2"/>', "invalid <pagefusion"),
        (f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on"><x/></p:page-fusion>', "invalid <"),
    ],
)
def test_bad_elements_give_one_line_reasons(metadata, reason):
    with pytest.raises(ElementError) as caught:
        value_of(domain(metadata, name='lab "vm" ü'))
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
    assert "'lab \"vm\" ü'" in message


def test_malformed_xml_is_one_line():
    with pytest.raises(ElementError) as caught:
        element.parse_domain("<domain><name>x</name>")
    assert "\n" not in str(caught.value)


def test_oversized_group_is_cut_in_the_message():
    with pytest.raises(ElementError) as caught:
        element.check_group("g" * 10_000)
    assert len(str(caught.value)) < 300


def test_round_trip_through_xml():
    value = PageFusion(enabled=True, group="ci-runners")
    xml = domain(value.to_xml())
    assert value_of(xml) == value


def stamp_of(xml: str) -> PageFusion | None:
    return element.stamp_from_domain(element.parse_domain(xml))


def test_the_running_stamp_is_read_apart_from_the_element():
    stamp = PageFusion(enabled=True, group="lab")
    xml = domain(
        f'<p:page-fusion xmlns:p="{NAMESPACE}" state="off"/>'
        f'<r:running xmlns:r="{STAMP_NAMESPACE}" state="on" group="lab"/>'
    )
    assert stamp_of(xml) == stamp
    assert value_of(xml) == PageFusion()
    assert stamp_of(domain(f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on"/>')) is None
    assert stamp_of("<domain><name>a</name></domain>") is None


def test_the_stamp_as_libvirt_takes_it_round_trips():
    value = PageFusion(enabled=True, group="ci")
    text = value.to_metadata_xml(element.STAMP_LOCAL_NAME)
    xml = domain(text.replace("<running ", f'<running xmlns="{STAMP_NAMESPACE}" '))
    assert stamp_of(xml) == value


@pytest.mark.parametrize(
    ("stamp", "reason"),
    [
        ('state="maybe"', "'maybe' is not valid"),
        ('state="on" group="a b"', "invalid page-fusion group"),
        ('state="on" extra="1"', "invalid <pagefusion-running:running>"),
    ],
)
def test_a_bad_stamp_gives_a_one_line_reason(stamp, reason):
    with pytest.raises(ElementError) as caught:
        stamp_of(domain(f'<r:running xmlns:r="{STAMP_NAMESPACE}" {stamp}/>'))
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
