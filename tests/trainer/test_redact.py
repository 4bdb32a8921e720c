"""PII redaction: what must be caught, and the ordinary numbers that must be left alone."""

from __future__ import annotations

import pytest

from trainer.redact import CARD, EMAIL, IBAN, PHONE, iban_valid, luhn_valid, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe+news@example.co.uk today", "write to [EMAIL] today"),
        ("ANNA_99@mail.example.org.", "[EMAIL]."),
        ("ring +44 20 7946 0958 now", "ring [PHONE] now"),
        ("+1-555-123-4567", "[PHONE]"),
        ("(555) 123-4567", "[PHONE]"),
        ("office 555-123-4567.", "office [PHONE]."),
        ("020 7946 0958", "[PHONE]"),
        ("call me on 07700900123", "call me on [PHONE]"),
        ("my phone number is 612 345 678", "my phone number is [PHONE]"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
        ("4111-1111-1111-1111", "[CARD]"),
        ("4111111111111111.", "[CARD]."),
        ("amex 3782 822463 10005", "amex [CARD]"),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [IBAN] please"),
        ("GB82WEST12345698765432", "[IBAN]"),
        ("gb82 west 1234 5698 7654 32", "[IBAN]"),
    ],
)
def test_redacts(text: str, expected: str) -> None:
    assert redact(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 42.",
        "on 2024-01-15 at 10:30",
        "born 15/01/2024, moved 01.02.2023",
        "pi is 3.14159265358979",
        "ping 192.168.100.200",
        "version 1.2.3",
        "about 1 000 000 000 people, or 1.000.000.000",
        "costs $1,299.99",
        "ISBN 978-3-16-148410-0",
        "order 123456789012",
        "population 8100000000",
        "recall 5551234567 items",
        "1234 5678 9012 3456",  # 16 digits, grouped like a card, Luhn fails
        "1234567890123456",
        "0000 0000 0000 0000",  # passes Luhn trivially
        "user@localhost",  # no TLD: not a routable address
    ],
)
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == (text, {})


def test_luhn_and_mod97() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert not luhn_valid("1234567890123456")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert iban_valid("gb82west12345698765432")
    assert not iban_valid("DE89 3704 0044 0532 0130 01")
    assert not iban_valid("DE89")


def test_invalid_iban_is_not_an_iban() -> None:
    assert IBAN not in redact("IBAN DE89 3704 0044 0532 0130 01")[0]


def test_counts_each_kind() -> None:
    text = "a@b.io, c@d.io, +33 6 12 34 56 78, 4111 1111 1111 1111, GB82WEST12345698765432"
    out, counts = redact(text)
    assert out == "[EMAIL], [EMAIL], [PHONE], [CARD], [IBAN]"
    assert counts == {EMAIL: 2, PHONE: 1, CARD: 1, IBAN: 1}


def test_idempotent() -> None:
    once, _ = redact("mail x@y.com, call +1 555 123 4567, pay 4111111111111111")
    assert redact(once) == (once, {})


def test_long_digit_run_followed_by_letters_is_fast() -> None:
    # Guards the number-run regex against catastrophic backtracking.
    text = "1 " * 5000 + "x" + "9" * 5000 + "a"
    assert redact(text)[0].endswith("a")
