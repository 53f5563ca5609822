"""PII redaction for audit content (opt-in ``content: redacted``).

Built-in detectors, applied in this order (earlier ones win, later ones never see replaced text):

=============  =========================================================================  ==============
name           what                                                                       replacement
=============  =========================================================================  ==============
email          local@domain.tld                                                           ``[EMAIL]``
cn_id          PRC resident ID (18 chars: 6-digit area, YYYYMMDD birth date, 3 digits,      ``[CN_ID]``
               check digit 0-9/X verified with the ISO 7064 MOD 11-2 checksum)
bank_card      13-19 digits, optionally in groups split by spaces/dashes, Luhn-valid       ``[BANK_CARD]``
cn_mobile      mainland-China mobile 1[3-9]x xxxx xxxx, optional +86/0086/86 prefix,         ``[PHONE]``
               optional space/dash separators (13812345678, +86 138-1234-5678)
phone          other formats: +CC international, (NNN) NNN-NNNN, NNN-NNN-NNNN,              ``[PHONE]``
               Chinese landlines 0NN(N)-NNNNNNN(N)
ipv4 / ipv6    addresses (IPv6 candidates are confirmed with ``ipaddress``)                 ``[IP]``
=============  =========================================================================  ==============

Numbers are matched only as whole digit runs (never inside a longer number), with ASCII digits only, so
Chinese text around them ("手机号13812345678，") is handled. Candidates that fail their checksum (an 18-digit
run with a wrong check digit, a 16-digit run that is not Luhn-valid) are left as they are: redaction aims
at real identifiers, not at every long number (order ids, timestamps). Extra patterns from the config run
after the built-in ones.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def cn_id_valid(s: str) -> bool:
    """True for an 18-character PRC resident ID whose birth date is plausible and check digit is right."""
    if len(s) != 18 or not s[:17].isascii() or not s[:17].isdigit():
        return False
    month, day = int(s[10:12]), int(s[12:14])
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == s[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        n = ord(c) - 48
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


def _card_ok(m: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", m.group(0))
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _id_ok(m: re.Match[str]) -> bool:
    return cn_id_valid(m.group(0))


def _ipv6_ok(m: re.Match[str]) -> bool:
    try:
        return isinstance(ipaddress.ip_address(m.group(0)), ipaddress.IPv6Address)
    except ValueError:
        return False


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: re.Pattern[str]
    replacement: str
    # Confirms a candidate match (checksums); None accepts every match.
    check: Callable[[re.Match[str]], bool] | None = None
    # A character every match contains: the detector is skipped for text without it (cheap pre-filter).
    needs: str | None = None

    def apply(self, text: str) -> tuple[str, int]:
        count = 0

        def sub(m: re.Match[str]) -> str:
            nonlocal count
            if self.check is not None and not self.check(m):
                return m.group(0)
            count += 1
            return self.replacement

        return self.pattern.sub(sub, text), count


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DIGIT = "0"  # marker for "needs": any ASCII digit

# Where easy, a pattern starts with the digit itself and looks behind from there ("[0-9](?<![0-9]{2})" is a
# digit not preceded by a digit): a leading look-behind keeps the regex engine from skipping to candidates.
BUILTIN: tuple[Detector, ...] = (
    Detector(
        "email",
        re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"),
        "[EMAIL]",
        needs="@",
    ),
    Detector(
        "cn_id",
        re.compile(r"[0-9](?<![0-9]{2})[0-9]{16}[0-9Xx](?![0-9A-Za-z])"),
        "[CN_ID]",
        _id_ok,
        _DIGIT,
    ),
    Detector(
        "bank_card",
        # never right after "+" (that is an international phone number)
        re.compile(
            r"[0-9](?<![0-9+][0-9])(?:[0-9]{3}[ -](?:[0-9]{4}[ -]){1,2}[0-9]{4,7}|[0-9]{12,18})(?![0-9])"
        ),
        "[BANK_CARD]",
        _card_ok,
        _DIGIT,
    ),
    Detector(
        "cn_mobile",
        re.compile(
            r"(?:(?:\+86|0(?<![0-9]0)086|8(?<![0-9]8)6)[ -]?1|1(?<![0-9]1))"
            r"[3-9][0-9](?:[0-9]{8}|[ -][0-9]{4}[ -][0-9]{4})(?![0-9])"
        ),
        "[PHONE]",
        needs=_DIGIT,
    ),
    Detector(
        "phone",
        re.compile(
            # +CC then more digits in groups (E.164-ish)
            r"\+(?<![0-9A-Za-z+]\+)[1-9][0-9]{0,2}(?:[ .\-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9])"
            # (NNN) NNN-NNNN  /  NNN-NNN-NNNN  /  NNN.NNN.NNNN
            r"|(?:\((?<![0-9]\()[0-9]{3}\)[ ]?|[0-9](?<![0-9]{2})[0-9]{2}[\-. ])[0-9]{3}[\-. ][0-9]{4}(?![0-9])"
            # Chinese landline: 010-12345678, 0755-1234567
            r"|0(?<![0-9]0)[1-9][0-9]{1,2}-[0-9]{7,8}(?![0-9])"
        ),
        "[PHONE]",
        needs=_DIGIT,
    ),
    Detector(
        "ipv4",
        re.compile(r"(?<![0-9.])(?:" + _OCTET + r"\.){3}" + _OCTET + r"(?!\.?[0-9])"),
        "[IP]",
        needs=".",
    ),
    Detector(
        "ipv6",
        re.compile(
            r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:[0-9]{1,3}\.){3}[0-9]{1,3})(?![0-9A-Za-z:])"
        ),
        "[IP]",
        _ipv6_ok,
        ":",
    ),
)


_HAS_DIGIT = re.compile(r"[0-9]")


class Redactor:
    """Applies the built-in detectors, then extra ``(name, regex, replacement)`` patterns."""

    def __init__(self, extra: Iterable[tuple[str, str, str | None]] = ()) -> None:
        self.detectors: list[Detector] = list(BUILTIN)
        for name, regex, replacement in extra:
            self.detectors.append(Detector(name, re.compile(regex), replacement or f"[{name.upper()}]"))

    @classmethod
    def from_settings(cls, patterns) -> Redactor:
        return cls((p.name, p.regex, p.replacement) for p in patterns)

    def redact(self, text: str) -> str:
        return self.redact_counted(text)[0]

    def redact_counted(self, text: str) -> tuple[str, dict[str, int]]:
        """The redacted text and how many matches each detector replaced (only those with matches)."""
        counts: dict[str, int] = {}
        has_digit = _HAS_DIGIT.search(text) is not None
        for d in self.detectors:
            if d.needs is not None and (not has_digit if d.needs == _DIGIT else d.needs not in text):
                continue
            text, n = d.apply(text)
            if n:
                counts[d.name] = counts.get(d.name, 0) + n
        return text, counts
