"""PII redaction for training text: emails, phone numbers, payment cards, IBANs.

Matches are replaced by placeholders (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`) rather than deleted,
so the model still learns the *shape* of an answer ("you can reach us at [EMAIL]") without ever
seeing whose address it was.

Precision matters as much as recall here: an over-eager redactor rewrites ordinary numbers, dates
and prices into placeholders and teaches the model nonsense. So every candidate is checked:

- cards: 13-19 digits, card-like grouping, and a valid Luhn checksum (random 16-digit numbers
  still pass 1 in 10, which is accepted: a false `[CARD]` costs little, a leaked card a lot);
- IBANs: ISO 13616 mod-97 checksum and length 15-34;
- phones: a leading `+` (E.164, 8-15 digits), or a grouped national number (9-12 digits) that is
  not shaped like a decimal, an IPv4 address or a thousands-grouped amount, or any 7-15 digit run
  right after a word such as "phone" or "call". Bare digit runs elsewhere are left alone: they
  are far more often order numbers, amounts or ids than phone numbers.

Pure stdlib; `redact` is deterministic and idempotent (placeholders contain no digits or `@`).
"""

from __future__ import annotations

import re
from collections import Counter

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
CARD = "[CARD]"
IBAN = "[IBAN]"

_EMAIL_RE = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")

# Country code, check digits, then groups of four (optionally space-separated), then a short tail.
_IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", re.IGNORECASE)

# A maximal run of digit groups joined by single separators. Separators are mandatory between
# groups: `\d+(?:[ .-]?\d+)*` would backtrack exponentially on a long run followed by a letter.
_NUMBER_RUN_RE = re.compile(
    r"(?<![\w+.\-])"  # not glued to a word, a sign or a decimal point
    r"(?:\+ ?)?"  # international prefix
    r"(?:\(\d{1,5}\) ?)?"  # (area code)
    r"\d+(?:[ .\-]\d+)*"
    r"(?!\w)"
)

# A phone-ish word shortly before a digit run makes even a bare run a phone number.
_PHONE_CONTEXT_RE = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|call|whatsapp|fax|sms|text me|reach me)\b\W{0,3}"
    r"(?:\w+\W{1,3}){0,3}$",
    re.IGNORECASE,
)
_CONTEXT_WINDOW = 40


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 == 1."""
    s = candidate.replace(" ", "").upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _is_card(run: str, digits: str, groups: list[str]) -> bool:
    if run.startswith("+") or "(" in run or "." in run:
        return False
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:  # all zeros passes Luhn
        return False
    # Cards are written unbroken or in blocks of 4-6 (4-4-4-4, Amex 4-6-5); anything else is
    # more likely a list of numbers that happens to be long.
    grouped_like_card = len(groups) == 1 or (
        all(4 <= len(g) <= 6 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 6
    )
    return grouped_like_card and luhn_valid(digits)


def _looks_numeric_not_phone(run: str, groups: list[str]) -> bool:
    """Shapes that are overwhelmingly not phone numbers: decimals, IPv4, 1 000 000, 1.000.000."""
    if "." in run and len(groups) == 2:
        return True
    if "." in run and len(groups) == 4 and all(len(g) <= 3 for g in groups):
        return True
    return len(groups) >= 3 and len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])


def _is_phone(run: str, digits: str, groups: list[str], before: str) -> bool:
    if _PHONE_CONTEXT_RE.search(before) and 7 <= len(digits) <= 15:
        return True
    if run.startswith("+"):
        return 8 <= len(digits) <= 15
    if len(groups) < 2 or not 9 <= len(digits) <= 12:
        return False
    return not _looks_numeric_not_phone(run, groups)


def _redact_number_run(match: re.Match[str], counts: Counter[str]) -> str:
    run = match.group(0)
    digits = re.sub(r"\D", "", run)
    groups = re.findall(r"\d+", run)
    if _is_card(run, digits, groups):
        counts[CARD] += 1
        return CARD
    before = match.string[max(0, match.start() - _CONTEXT_WINDOW) : match.start()]
    if _is_phone(run, digits, groups, before):
        counts[PHONE] += 1
        return PHONE
    return run


def _redact_iban(match: re.Match[str], counts: Counter[str]) -> str:
    if iban_valid(match.group(0)):
        counts[IBAN] += 1
        return IBAN
    return match.group(0)


def _redact_email(match: re.Match[str], counts: Counter[str]) -> str:
    counts[EMAIL] += 1
    return EMAIL


def redact(text: str) -> tuple[str, Counter[str]]:
    """Replace PII in `text` by placeholders; return the new text and a count per placeholder.

    Order matters: emails first (their local part may hold digits), then IBANs (their digits would
    otherwise be read as a card or phone), then the remaining digit runs.
    """
    counts: Counter[str] = Counter()
    text = _EMAIL_RE.sub(lambda m: _redact_email(m, counts), text)
    text = _IBAN_RE.sub(lambda m: _redact_iban(m, counts), text)
    text = _NUMBER_RUN_RE.sub(lambda m: _redact_number_run(m, counts), text)
    return text, counts
