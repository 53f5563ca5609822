"""PII and secret redaction for audit records: prompt text under ``content: redacted``, and identifiers
(URL path, model name, user id) under every content policy.

The text is normalised first (:func:`normalize`): full-width digits and letters, ideographic and no-break
spaces and ``＋``/``＠`` become their ASCII forms, invisible format characters (zero-width space/joiners,
BOM, soft hyphen, bidi controls) are removed; Chinese text and punctuation stay. The stored text is the
normalised text, redacted.

Built-in detectors, in priority order (where two matches overlap, the earlier detector wins):

=============  =========================================================================  ==============
name           what                                                                       replacement
=============  =========================================================================  ==============
secret         our API keys (sk-llm-...) and sk-... keys, JWTs (eyJ...eyJ...), AWS/Alibaba  ``[SECRET]``
               /Tencent/Google/GitHub/GitLab/Slack/Stripe/Hugging Face key formats, PEM
               private keys; ``password=...``/``api_key: ...``/``密码：...`` (the value only)
email          local@domain.tld                                                           ``[EMAIL]``
cn_id          PRC resident ID (18 chars, or 6-8-4 groups: area, YYYYMMDD birth date, 3    ``[CN_ID]``
               digits, check digit 0-9/X verified with the ISO 7064 MOD 11-2 checksum)
bank_card      13-19 digits, optionally in groups split by spaces/dashes, a known issuer   ``[BANK_CARD]``
               prefix with a length it issues, Luhn-valid
cn_mobile      mainland-China mobile 1[3-9]x xxxx xxxx, optional +86/0086/86/(+86) prefix,   ``[PHONE]``
               separators " -._" between 3-4-4 / 3-8 / 7-4 groups, (138) 1234-5678
phone          other formats: +CC international, (NNN) NNN-NNNN, NNN-NNN-NNNN,              ``[PHONE]``
               Chinese landlines 0NN(N)-NNNNNNN(N), (0NN)NNNNNNNN
ipv4 / ipv6    addresses (IPv6 candidates are confirmed with ``ipaddress``)                 ``[IP]``
=============  =========================================================================  ==============

Numbers are matched only as whole digit runs (never inside a longer number), so Chinese text around them
("手机号13812345678，") is handled. Candidates that fail their checksum (an 18-digit run with a wrong check
digit, a card number that is not Luhn-valid or has no issuer prefix) are left as they are: redaction aims at
real identifiers, not at every long number (order ids, timestamps, barcodes). Extra patterns from the
config run after the built-in ones. Quality and speed on ``tests/data/redaction_corpus.jsonl``:
``scripts/bench_redaction.py``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
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


# Issuer prefixes of payment cards and the lengths they issue: Visa 4 (13/16/19), Mastercard 51-55 and
# 2221-2720 (16), Amex 34/37 (15), Diners 30/36/38 (14-16), JCB 35 (16-19), UnionPay/Discover/Maestro 6
# (16-19). Order numbers, ms timestamps (1...), dated ids (20...) and EAN-13 barcodes (69...: every product
# sold in China) are left alone.
_CARD_RULES = (
    (re.compile(r"4"), (13, 16, 19)),
    (re.compile(r"5[1-5]|222[1-9]|22[3-9][0-9]|2[3-6][0-9]{2}|27[01][0-9]|2720"), (16,)),
    (re.compile(r"3[47]"), (15,)),
    (re.compile(r"3[068]"), (14, 15, 16)),
    (re.compile(r"35"), (16, 17, 18, 19)),
    (re.compile(r"6"), (16, 17, 18, 19)),
)


def card_plausible(digits: str) -> bool:
    """A known issuer prefix, a length that issuer uses, and a valid Luhn check digit."""
    n = len(digits)
    return any(p.match(digits) and n in lengths for p, lengths in _CARD_RULES) and luhn_valid(digits)


def _card_ok(m: re.Match[str]) -> bool:
    return card_plausible(m.group(0).replace(" ", "").replace("-", ""))


def _id_ok(m: re.Match[str]) -> bool:
    return cn_id_valid(m.group(0).replace(" ", "").replace("-", ""))


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
    # Where candidates are looked for (see Redactor): "numeric" (number-like spans only), "secret", "email",
    # "ipv6" (around their trigger characters), or None (the whole text: extra patterns from the config).
    scope: str | None = None

    def replace(self, m: re.Match[str]) -> str:
        if self.name == "secret":
            return _secret_sub(m)
        return self.replacement


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Separators people type inside a number ("138 1234 5678", "138-1234-5678", "138.1234.5678", "138_1234_5678").
_SEP = r"[ \-._]?"


# Secrets: our API key format, JWTs, common cloud/provider key formats, PEM private keys, and credentials
# written as an assignment ("password=...", "api_key: ..."). One alternation: one pass over the text.
_SECRET = re.compile(
    r"-----BEGIN [A-Z ]{0,20}PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]{0,20}PRIVATE KEY-----|$)"
    r"|eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"
    r"|(?<![A-Za-z0-9_\-])(?:"
    r"sk-[A-Za-z0-9_\-]{20,}"  # sk-llm-... (ours), sk-proj-..., sk-ant-...
    r"|(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}"  # AWS access key ids
    r"|LTAI[0-9A-Za-z]{12,24}"  # Alibaba Cloud AccessKey ID
    r"|AKID[0-9A-Za-z]{13,40}"  # Tencent Cloud SecretId
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API key
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r")(?![A-Za-z0-9_\-])"
)
# Credentials written as an assignment: the label stays, the value goes.
_ASSIGNMENT = re.compile(
    r"(?i:(?<![A-Za-z0-9])(?:password|passwd|pwd|secret|secret[_\-]?key|access[_\-]?key|api[_\-]?key|token|"
    r"密码|口令|密钥)(?![A-Za-z0-9])[\"']?\s{0,3}[:=：]\s{0,3}[\"']?)(?P<val>[^\s\"',;，；]{8,})"
)


def _secret_sub(m: re.Match[str]) -> str:
    val = m.groupdict().get("val")
    if val is not None:
        # Keep the label ("password=") readable; replace the value only.
        return m.group(0)[: m.start("val") - m.start(0)] + "[SECRET]"
    return "[SECRET]"


# Where easy, a pattern starts with the digit itself and looks behind from there ("[0-9](?<![0-9]{2})" is a
# digit not preceded by a digit): a leading look-behind keeps the regex engine from skipping to candidates.
BUILTIN: tuple[Detector, ...] = (
    Detector("secret", _SECRET, "[SECRET]", scope="secret"),
    Detector(
        "email",
        re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"),
        "[EMAIL]",
        scope="email",
    ),
    Detector(
        "cn_id",
        # 18 characters, or 6-8-4 with the separators people type
        re.compile(r"[0-9](?<![0-9]{2})[0-9]{5}(?:[ \-]?)[0-9]{8}(?:[ \-]?)[0-9]{3}[0-9Xx](?![0-9A-Za-z])"),
        "[CN_ID]",
        _id_ok,
        scope="numeric",
    ),
    Detector(
        "bank_card",
        # never right after "+" (that is an international phone number)
        re.compile(
            r"[0-9](?<![0-9+][0-9])(?:[0-9]{3}[ -](?:[0-9]{4}[ -]){1,3}[0-9]{1,7}|[0-9]{5}[ -][0-9]{13}|[0-9]{12,18})(?![0-9])"
        ),
        "[BANK_CARD]",
        _card_ok,
        scope="numeric",
    ),
    Detector(
        "cn_mobile",
        re.compile(
            # with a country prefix: +86 / 0086 / (+86) / 86, then the number
            r"(?:\(?(?:\+|0(?<![0-9]0)0)86\)?|8(?<![0-9]8)6)[ \-.]?1[3-9][0-9]"
            + _SEP
            + r"[0-9]{4}"
            + _SEP
            + r"[0-9]{4}(?![0-9])"
            # the number alone: 138 1234 5678 and the other separators, (138) 1234-5678
            r"|1(?<![0-9]1)[3-9][0-9]" + _SEP + r"[0-9]{4}" + _SEP + r"[0-9]{4}(?![0-9])"
            r"|\(1(?<![0-9]\(1)[3-9][0-9]\)[ \-]?[0-9]{4}" + _SEP + r"[0-9]{4}(?![0-9])"
        ),
        "[PHONE]",
        scope="numeric",
    ),
    Detector(
        "phone",
        re.compile(
            # +CC then more digits in groups (E.164-ish)
            r"\+(?<![0-9A-Za-z+]\+)[1-9][0-9]{0,2}(?:[ .\-]?\(?[0-9]{1,4}\)?){2,5}(?![0-9])"
            # (NNN) NNN-NNNN  /  NNN-NNN-NNNN  /  NNN.NNN.NNNN
            r"|(?:\((?<![0-9]\()[0-9]{3}\)[ ]?|[0-9](?<![0-9]{2})[0-9]{2}[\-. ])[0-9]{3}[\-. ][0-9]{4}(?![0-9])"
            # Chinese landline: 010-12345678, 0755-1234567, (010)12345678
            r"|0(?<![0-9]0)[1-9][0-9]{1,2}-[0-9]{7,8}(?![0-9])|\(0[1-9][0-9]{1,2}\)[ ]?[0-9]{7,8}(?![0-9])"
        ),
        "[PHONE]",
        scope="numeric",
    ),
    Detector(
        "ipv4",
        re.compile(r"(?<![0-9.])(?:" + _OCTET + r"\.){3}" + _OCTET + r"(?!\.?[0-9])"),
        "[IP]",
        scope="numeric",
    ),
    Detector(
        "ipv6",
        re.compile(
            r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:[0-9]{1,3}\.){3}[0-9]{1,3})(?![0-9A-Za-z:])"
        ),
        "[IP]",
        _ipv6_ok,
        scope="ipv6",
    ),
)


def _normalization_table() -> dict[str, str]:
    """Characters that read as an ASCII letter, digit, space or one of ``+@.-_:=`` (full-width forms,
    ideographic and no-break spaces, mathematical digit forms: their NFKC form), mapped to
    it; and invisible format characters (category Cf: zero-width space/joiners, BOM, soft hyphen, bidi
    controls), mapped to nothing. Chinese punctuation and text stay as they are."""
    keep = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+@.-_ ")
    table: dict[str, str] = {}
    # The BMP, mathematical alphanumerics and segmented digits: every other plane has no such characters.
    for c in (*range(0x80, 0x10000), *range(0x1D400, 0x1D800), *range(0x1FBF0, 0x1FBFA)):
        ch = chr(c)
        if unicodedata.category(ch) == "Cf":
            table[ch] = ""
            continue
        n = unicodedata.normalize("NFKC", ch)
        if len(n) == 1 and n in keep:
            table[ch] = n
        elif ch.isspace():
            table[ch] = " "
    for c in range(0xE0000, 0xE0080):  # tag characters
        table[chr(c)] = ""
    return table


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class of ``chars`` written as ranges (one big class of ranges is scanned fast)."""
    cps = sorted(ord(c) for c in chars)
    out: list[str] = []
    start = prev = cps[0]
    for c in [*cps[1:], -1]:
        if c == prev + 1:
            prev = c
            continue
        out.append(
            re.escape(chr(start)) if start == prev else f"{re.escape(chr(start))}-{re.escape(chr(prev))}"
        )
        start = prev = c
    return "[" + "".join(out) + "]"


_NORMALIZE = _normalization_table()
# Two classes: a class with characters beyond the BMP is much slower to scan, and those are rare.
_NORMALIZE_RE = re.compile(_char_class(c for c in _NORMALIZE if ord(c) < 0x10000))
_NORMALIZE_ASTRAL_RE = re.compile(_char_class(c for c in _NORMALIZE if ord(c) >= 0x10000))


def _normalized_char(m: re.Match[str]) -> str:
    return _NORMALIZE[m.group(0)]


def normalize(text: str) -> str:
    """The text as a matcher should see it: characters that read as ASCII letters, digits, spaces or ``+@.-_`` in their ASCII form (NFKC of those: ``１３８``, ``＋86``, ``＠``), invisible format
    characters removed. Everything else (Chinese text and punctuation) is kept as it is."""
    if text.isascii():
        return text
    if _NORMALIZE_RE.search(text) is not None:
        text = _NORMALIZE_RE.sub(_normalized_char, text)
    if max(text) >= "\U00010000":
        text = _NORMALIZE_ASTRAL_RE.sub(_normalized_char, text)
    return text


# Number-like spans: a digit, "+" or "(" and then digits and the separators numbers are written with. Only
# spans with enough digits are handed to the numeric detectors (searched within the span and two characters
# after it, for their look-aheads; their look-behinds see the text before it).
_NUM_SPAN = re.compile(r"[0-9](?:[ ()\-._+]{0,3}[0-9]){3,}")
_NUM_PREFIX = frozenset("+( ")
_NON_DIGIT = re.compile(r"[^0-9]+")
# Literal triggers of the secret formats (found with str.find, far cheaper than a regex alternation), and the
# keywords of "password=..." style assignments (searched for a few characters around).
_SECRET_TOKENS = ("eyJ", "-----BEGIN", "rk_", "LTAI", "xox", "hf_")
# Regexes that start with a literal are searched as fast as str.find; one per group of formats.
_SECRET_STARTS = (
    re.compile(r"sk[-_]"),
    re.compile(r"A(?:KIA|SIA|GPA|IDA|ROA|KID|Iza)"),
    re.compile(r"g(?:h[pousr]_|ithub_pat_|lpat-)"),
)
_SECRET_WORDS = ("pass", "pwd", "secret", "key", "token")
_SECRET_WORDS_ZH = ("密码", "口令", "密钥")
_IPV6_CHARS = frozenset("0123456789ABCDEFabcdef:.")


_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-")
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")


def _back(text: str, i: int, chars: frozenset[str], limit: int) -> int:
    """The start of the run of ``chars`` that ends at ``i`` (at most ``limit`` characters back)."""
    j = i
    stop = max(0, i - limit)
    while j > stop and text[j - 1] in chars:
        j -= 1
    return j


def _find_all(text: str, needle: str) -> Iterator[int]:
    i = text.find(needle)
    while i >= 0:
        yield i
        i = text.find(needle, i + 1)


class Redactor:
    """Applies the built-in detectors, then extra ``(name, regex, replacement)`` patterns.

    Built-in detectors look only where a match can be (number-like spans, the literal start of a secret
    format, an ``@``, a ``:`` between hex digits): plain prose costs one scan for number-like spans and a few
    ``str.find`` calls. Every candidate is matched against the original text; where two overlap, the
    detector earlier in :data:`BUILTIN` wins; the output is assembled once.
    """

    def __init__(self, extra: Iterable[tuple[str, str, str | None]] = ()) -> None:
        self.detectors: list[Detector] = list(BUILTIN)
        self.extra: list[Detector] = [
            Detector(name, re.compile(regex), replacement or f"[{name.upper()}]")
            for name, regex, replacement in extra
        ]
        self.detectors += self.extra
        self._numeric = [d for d in BUILTIN if d.scope == "numeric"]
        self._by_scope = {d.scope: d for d in BUILTIN if d.scope != "numeric"}

    @classmethod
    def from_settings(cls, patterns) -> Redactor:
        return cls((p.name, p.regex, p.replacement) for p in patterns)

    def redact(self, text: str) -> str:
        return self.redact_counted(text)[0]

    def redact_counted(self, text: str) -> tuple[str, dict[str, int]]:
        """The redacted text and how many matches each detector replaced (only those with matches).

        The text is normalised first (:func:`normalize`): the result is the normalised text, redacted."""
        text = normalize(text)
        # (start, end, replacement, detector name), in priority order of the detector that found it.
        found: list[tuple[int, int, str, str]] = []

        def take(d: Detector, m: re.Match[str]) -> None:
            s, e = m.span()
            if e == s:
                return
            for fs, fe, _, _ in found:
                if s < fe and fs < e:
                    return
            if d.check is not None and not d.check(m):
                return
            found.append((s, e, d.replace(m), d.name))

        n = len(text)
        secret = self._by_scope["secret"]
        starts = [i for tok in _SECRET_TOKENS for i in _find_all(text, tok)]
        starts += [m.start() for r in _SECRET_STARTS for m in r.finditer(text)]
        for i in starts:
            m = secret.pattern.match(text, i)
            if m is not None:
                take(secret, m)
        # Keywords in any case: searched in the lower-cased text (same offsets: lower() keeps the length of
        # ASCII text; other text is searched in the cases people write).
        ascii_text = text.isascii()
        low = text.lower() if ascii_text else text
        words = (
            _SECRET_WORDS
            if ascii_text
            else (
                *_SECRET_WORDS,
                *(w.upper() for w in _SECRET_WORDS),
                *(w.capitalize() for w in _SECRET_WORDS),
                *_SECRET_WORDS_ZH,
            )
        )
        for word in words:
            for i in _find_all(low, word):
                # The assignment may start a little before the word ("api_key", "access-key"): try there too.
                j = _back(text, i, _WORD_CHARS, 16)
                for start in (j, i) if j != i else (i,):
                    m = _ASSIGNMENT.match(text, start)
                    if m is not None:
                        take(secret, m)
                        break
        if "@" in text:
            email = self._by_scope["email"]
            for i in _find_all(text, "@"):
                m = email.pattern.match(text, _back(text, i, _EMAIL_LOCAL, 64))
                if m is not None:
                    take(email, m)
        for sm in _NUM_SPAN.finditer(text):
            s, e = sm.span()
            span = sm.group(0)
            if e - s < 7 and span.count(".") < 3:
                continue
            if len(_NON_DIGIT.sub("", span)) < 7 and span.count(".") < 3:
                continue
            # A prefix of the number ("+86 ", "(+86)", "(010)") starts a little before its first digit.
            s = _back(text, s, _NUM_PREFIX, 5)
            for d in self._numeric:
                for m in d.pattern.finditer(text, s, min(n, e + 2)):
                    take(d, m)
        if ":" in text:
            ipv6 = self._by_scope["ipv6"]
            done = -1
            for i in _find_all(text, ":"):
                if i < done:
                    continue
                s = _back(text, i, _IPV6_CHARS, 45)
                e = i + 1
                while e < n and e - s < 64 and text[e] in _IPV6_CHARS:
                    e += 1
                done = e
                if text.count(":", s, e) >= 2:
                    for m in ipv6.pattern.finditer(text, s, min(n, e + 1)):
                        take(ipv6, m)
        counts: dict[str, int] = {}
        if found:
            found.sort()
            parts = []
            pos = 0
            for s, e, rep, name in found:
                parts.append(text[pos:s])
                parts.append(rep)
                pos = e
                counts[name] = counts.get(name, 0) + 1
            parts.append(text[pos:])
            text = "".join(parts)
        for d in self.extra:
            hits = 0

            def sub(m: re.Match[str], d: Detector = d) -> str:
                nonlocal hits
                hits += 1
                return d.replacement

            text = d.pattern.sub(sub, text)
            if hits:
                counts[d.name] = counts.get(d.name, 0) + hits
        return text, counts
