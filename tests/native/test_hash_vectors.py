"""Known-answer tests of the page fingerprint.

The fingerprint is pagefusion's own keyed hash (see native/pfcore.h), so there
are no published vectors.  ``reference_fingerprint`` below is a plain Python
transcription of that description, written independently of the C code; the
tests check that the native core (whichever of its SSE2, NEON or scalar
paths the build picked) agrees with it on a set of pages and keys.  The
literal values in ``PINNED`` were computed once with this reference and are
kept so that any change to the hash, on either side, shows up as a failure:
fingerprints are published between workers, so they must not drift.
"""

from __future__ import annotations

import random
import struct

import pytest

from pagefusion import scanner
from pagefusion.errors import PagefusionError

PAGE = 4096
MASK64 = (1 << 64) - 1
MIX_MUL_A = 0xBB67AE8584CAA73B  # fractional part of sqrt(3)
MIX_MUL_B = 0xA54FF53A5F1D36F1  # fractional part of sqrt(7)
SCHEDULE_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio
LANES = 8
FP_FIRST = 2


def mix64(z: int) -> int:
    z ^= z >> 32
    z = (z * MIX_MUL_A) & MASK64
    z ^= z >> 29
    z = (z * MIX_MUL_B) & MASK64
    z ^= z >> 32
    return z


def schedule(key: bytes) -> list[int]:
    """Words 0..33: lane masks, lane steps, product folds, sum folds, seed, key id."""
    k0, k1 = struct.unpack("<QQ", key)
    return [mix64(k0 ^ mix64((k1 + (j + 1) * SCHEDULE_GAMMA) & MASK64)) for j in range(34)]


def reference_fingerprint(key: bytes, page: bytes) -> int:
    assert len(page) == PAGE
    if not any(page):
        return 0
    words = schedule(key)
    mask = words[0:8]
    step = words[8:16]
    fold_prod = words[16:24]
    fold_sum = words[24:32]
    seed = words[32]
    prod = [0] * LANES
    total = [0] * LANES
    data = struct.unpack(f"<{PAGE // 8}Q", page)
    for stripe in range(PAGE // 64):
        for lane in range(LANES):
            word = data[stripe * LANES + lane]
            mixed = word ^ mask[lane]
            prod[lane] = (prod[lane] + (mixed & 0xFFFFFFFF) * (mixed >> 32)) & MASK64
            total[lane] = (total[lane] + word) & MASK64
            mask[lane] = (mask[lane] + step[lane]) & MASK64
    fp = seed
    for lane in range(LANES):
        product = (prod[lane] ^ fold_prod[lane]) * (total[lane] ^ fold_sum[lane])
        fp = (fp + ((product & MASK64) ^ (product >> 64))) & MASK64
    fp = mix64(fp)
    return fp + FP_FIRST if fp < FP_FIRST else fp


KEY_A = bytes(range(16))
KEY_B = bytes.fromhex("8f3a1c6e5b2d7f0499e1c4a6b3d2f7e1")


def sample_pages() -> dict[str, bytes]:
    rng = random.Random(20240611)
    return {
        "zero": bytes(PAGE),
        "ones": b"\xff" * PAGE,
        "counting": bytes(i & 0xFF for i in range(PAGE)),
        "last-byte": bytes(PAGE - 1) + b"\x01",
        "first-byte": b"\x01" + bytes(PAGE - 1),
        "text": (b"pagefusion " * 400)[:PAGE],
        "random": rng.randbytes(PAGE),
    }


# Computed once with reference_fingerprint above; see the module docstring.
PINNED = {
    (KEY_A, "ones"): 0xC17A43D93174A960,
    (KEY_A, "counting"): 0x746347F0582FB9BD,
    (KEY_A, "last-byte"): 0xB811FE05A9C97022,
    (KEY_B, "text"): 0x0818CB1403D5A595,
    (KEY_B, "random"): 0xAC4049168B17DA6A,
}


@pytest.mark.parametrize("key", [KEY_A, KEY_B], ids=["key-a", "key-b"])
def test_native_matches_reference(key: bytes) -> None:
    pages = sample_pages()
    native = scanner.fingerprint_buffer(key, b"".join(pages.values()))
    for (name, page), value in zip(pages.items(), native, strict=True):
        assert value == reference_fingerprint(key, page), name


@pytest.mark.parametrize(
    ("key", "name"), list(PINNED), ids=lambda v: v if isinstance(v, str) else ""
)
def test_pinned_values(key: bytes, name: str) -> None:
    page = sample_pages()[name]
    assert reference_fingerprint(key, page) == PINNED[key, name]
    assert scanner.fingerprint_buffer(key, page)[0] == PINNED[key, name]


def test_zero_page_has_fixed_fingerprint_under_any_key() -> None:
    zero = bytes(2 * PAGE)
    assert list(scanner.fingerprint_buffer(KEY_A, zero)) == [scanner.FP_ZERO] * 2
    assert list(scanner.fingerprint_buffer(KEY_B, zero)) == [scanner.FP_ZERO] * 2
    assert scanner.page_is_zero(bytes(PAGE))
    assert not scanner.page_is_zero(bytes(PAGE - 1) + b"\x80")


def test_fingerprint_is_keyed_and_position_sensitive() -> None:
    rng = random.Random(5)
    page = rng.randbytes(PAGE)
    # The same 64-byte stripes in another order must not collide.
    swapped = page[64:128] + page[0:64] + page[128:]
    one_bit = bytes([page[0] ^ 1]) + page[1:]
    fps = scanner.fingerprint_buffer(KEY_A, page + swapped + one_bit)
    assert len(set(fps)) == 3
    assert scanner.fingerprint_buffer(KEY_B, page)[0] != fps[0]
    assert min(fps) >= FP_FIRST


def test_unaligned_buffer_gives_same_fingerprints() -> None:
    pages = b"".join(sample_pages().values())
    shifted = bytearray(len(pages) + 3)
    shifted[3:] = pages
    view = memoryview(shifted)[3:]
    assert scanner.fingerprint_buffer(KEY_A, view) == scanner.fingerprint_buffer(KEY_A, pages)


def test_many_random_pages_all_distinct() -> None:
    rng = random.Random(11)
    count = 4096
    fps = scanner.fingerprint_buffer(KEY_B, rng.randbytes(count * PAGE))
    assert len(set(fps)) == count


def test_key_id_in_export_header_matches_schedule() -> None:
    # The published set carries schedule word 33 so a worker can refuse sets
    # made under another key; reading our own pid is enough to get a header.
    import os

    with scanner.PageScanner(os.getpid(), KEY_A, pages_per_pass=1) as pages:
        header = pages.fingerprints()[:32]
    magic, version, header_size, _, _, key_id, _ = struct.unpack("<IHHIIQQ", header)
    assert (magic, version, header_size) == (0x50464650, 1, 32)
    assert key_id == schedule(KEY_A)[33]


@pytest.mark.parametrize(
    "bad_key", [b"", bytes(15), bytes(17), "0123456789abcdef"], ids=["0", "15", "17", "str"]
)
def test_wrong_key_is_refused(bad_key: object) -> None:
    with pytest.raises(PagefusionError, match="key must be exactly 16 bytes, got"):
        scanner.fingerprint_buffer(bad_key, bytes(PAGE))  # type: ignore[arg-type]


def test_key_error_says_what_was_given() -> None:
    with pytest.raises(ValueError, match="got 15 bytes"):
        scanner.fingerprint_buffer(bytes(15), bytes(PAGE))


@pytest.mark.parametrize("size", [1, PAGE - 1, PAGE + 1, 3 * PAGE - 8])
def test_buffer_must_be_whole_pages(size: int) -> None:
    with pytest.raises(PagefusionError, match=f"multiple of {PAGE} bytes, got {size} bytes"):
        scanner.fingerprint_buffer(KEY_A, bytes(size))


def test_page_is_zero_wants_one_page() -> None:
    with pytest.raises(PagefusionError, match=f"exactly {PAGE} bytes"):
        scanner.page_is_zero(bytes(2 * PAGE))
    with pytest.raises(PagefusionError, match="bytes-like"):
        scanner.page_is_zero(12)


def test_empty_buffer_has_no_fingerprints() -> None:
    assert len(scanner.fingerprint_buffer(KEY_A, b"")) == 0
