"""PII redaction on realistic Chinese and English text (gateway/audit/redact.py)."""

from __future__ import annotations

import pytest

from gateway.audit.redact import Redactor, cn_id_valid, luhn_valid


@pytest.fixture(scope="module")
def r() -> Redactor:
    return Redactor()


def _id_with_check(first17: str) -> str:
    # Independent computation of the ISO 7064 MOD 11-2 check character.
    w = [2 ** (17 - i) % 11 for i in range(17)]
    s = sum(int(c) * k for c, k in zip(first17, w, strict=True))
    return first17 + "10X98765432"[s % 11]


def _luhn_complete(prefix: str) -> str:
    for d in "0123456789":
        n = prefix + d
        digits = [int(c) for c in reversed(n)]
        total = sum(digits[0::2]) + sum(sum(divmod(2 * x, 10)) for x in digits[1::2])
        if total % 10 == 0:
            return n
    raise AssertionError


@pytest.mark.parametrize(
    "text,expected",
    [
        ("患者张三，手机号13812345678，明天复诊。", "患者张三，手机号[PHONE]，明天复诊。"),
        ("请拨打 +86 138-1234-5678 联系家属", "请拨打 [PHONE] 联系家属"),
        ("电话:+8613912345678;备用 0086 159 1234 5678", "电话:[PHONE];备用 [PHONE]"),
        ("Call me at (415) 555-2671 or +44 20 7946 0958.", "Call me at [PHONE] or [PHONE]."),
        ("Office: 415-555-2671, fax 415.555.2672", "Office: [PHONE], fax [PHONE]"),
        ("门诊座机010-62345678转分机", "门诊座机[PHONE]转分机"),
        ("邮箱zhang.san+lab@hospital.example.com.cn，抄送li_si@example.org。", "邮箱[EMAIL]，抄送[EMAIL]。"),
        ("Send the report to Jane.Doe@example.co.uk please", "Send the report to [EMAIL] please"),
        ("登录自 192.168.10.23，网关 10.0.0.1.", "登录自 [IP]，网关 [IP]."),
        ("client 2001:db8::8a2e:370:7334 and ::1 and fe80::1%", "client [IP] and [IP] and [IP]%"),
    ],
)
def test_redacts(r: Redactor, text: str, expected: str) -> None:
    assert r.redact(text) == expected


def test_prc_id_with_valid_checksum_is_redacted(r: Redactor) -> None:
    ids = ["110101199003074514", _id_with_check("44030619851231002"), _id_with_check("32010219770101123")]
    for i in ids:
        assert cn_id_valid(i), i
        out, counts = r.redact_counted(f"身份证号：{i}，请核对。")
        assert out == "身份证号：[CN_ID]，请核对。"
        assert counts == {"cn_id": 1}
    x_id = next(
        _id_with_check(f"11010119900307{n:03d}")
        for n in range(1000)
        if _id_with_check(f"11010119900307{n:03d}").endswith("X")
    )
    assert r.redact(f"ID {x_id.lower()} ok") == "ID [CN_ID] ok"


def test_prc_id_with_wrong_checksum_is_kept(r: Redactor) -> None:
    good = "110101199003074514"
    bad = good[:17] + ("5" if good[17] != "5" else "6")
    assert not cn_id_valid(bad)
    out = r.redact(f"编号{bad}不是身份证")
    assert bad in out and "[CN_ID]" not in out


def test_luhn_valid_cards_redacted_invalid_kept(r: Redactor) -> None:
    valid = ["4111111111111111", "5500005555555559", "378282246310005", _luhn_complete("621700123456789012")]
    for card in valid:
        assert luhn_valid(card)
        assert r.redact(f"卡号{card}，有效期12/28") == "卡号[BANK_CARD]，有效期12/28"
    spaced = "4111 1111 1111 1111"
    assert r.redact(f"card {spaced} on file") == "card [BANK_CARD] on file"
    dashed = "5500-0055-5555-5559"
    assert r.redact(f"card {dashed}.") == "card [BANK_CARD]."
    invalid = "4111111111111112"
    assert not luhn_valid(invalid)
    assert r.redact(f"order {invalid} shipped") == f"order {invalid} shipped"
    assert r.redact("card 4111 1111 1111 1112 declined") == "card 4111 1111 1111 1112 declined"


def test_leaves_ordinary_numbers_alone(r: Redactor) -> None:
    for text in [
        "版本 1.2.3，时间 12:30:45，订单号20231129000001，金额 13800 元",
        "The meeting is at 10:30, room 1203, 2024-05-01.",
        "Model v2.1.0 scored 98.76 on the benchmark",
    ]:
        assert r.redact(text) == text


def test_digits_inside_longer_numbers_are_not_phones(r: Redactor) -> None:
    # 12 digits starting with a mobile-looking run: not a phone, not a card (too short), not an ID.
    assert r.redact("流水号 138123456789 已登记") == "流水号 138123456789 已登记"


def test_mixed_medical_note(r: Redactor) -> None:
    note = (
        "主诉：患者李四（身份证110101199003074514，电话13987654321）自述头痛三天。"
        "家属邮箱 lisi.family@example.com，医保卡关联银行卡 6217001234567890123 (invalid) "
        "及 4111-1111-1111-1111。登记终端 172.16.5.4。"
    )
    out, counts = r.redact_counted(note)
    assert "110101199003074514" not in out and "13987654321" not in out
    assert "lisi.family@example.com" not in out and "4111-1111-1111-1111" not in out
    assert "172.16.5.4" not in out
    assert counts["cn_id"] == 1 and counts["cn_mobile"] == 1 and counts["email"] == 1 and counts["ipv4"] == 1
    assert ("6217001234567890123" in out) == (not luhn_valid("6217001234567890123"))
    assert out.startswith("主诉：患者李四（身份证[CN_ID]，电话[PHONE]）自述头痛三天。")


def test_extra_patterns_from_config() -> None:
    from gateway.audit.config import AuditSettings

    s = AuditSettings(
        redaction_patterns=[
            {"name": "mrn", "regex": r"MRN-\d{6}"},
            {"name": "passport", "regex": r"\b[EG]\d{8}\b", "replacement": "<PASSPORT>"},
        ]
    )
    r = Redactor.from_settings(s.redaction_patterns)
    out, counts = r.redact_counted("病历号 MRN-004521，护照 E12345678，电话 13812345678")
    assert out == "病历号 [MRN]，护照 <PASSPORT>，电话 [PHONE]"
    assert counts == {"mrn": 1, "passport": 1, "cn_mobile": 1}


def test_bad_extra_pattern_is_a_config_error() -> None:
    from pydantic import ValidationError

    from gateway.audit.config import AuditSettings

    with pytest.raises(ValidationError):
        AuditSettings(redaction_patterns=[{"name": "x", "regex": "("}])
