"""Writes tests/data/redaction_corpus.jsonl: the table the redaction test and benchmark run on.

Each line is ``{"id", "lang", "kind", "text", "secret"}``. ``kind`` is the detector that must fire for a
positive (``null`` for a negative: nothing may be replaced), ``secret`` the written form that must not survive.
Positives are the written forms people actually use (separators, full-width digits, invisible characters,
prefixes), in Chinese and English sentences; negatives are ordinary text full of numbers that are not
personal data (dates, versions, prices, order and tracking numbers, hashes, times).

Deterministic: re-running it writes the same file.

    python scripts/make_redaction_corpus.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "redaction_corpus.jsonl"
ZW = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"]


def fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else ("\u3000" if c == " " else c) for c in s)


def id_with_check(first17: str) -> str:
    w = [2 ** (17 - i) % 11 for i in range(17)]
    return first17 + "10X98765432"[sum(int(c) * k for c, k in zip(first17, w, strict=True)) % 11]


def luhn_complete(prefix: str) -> str:
    for d in "0123456789":
        n = prefix + d
        digits = [int(c) for c in reversed(n)]
        if (sum(digits[0::2]) + sum(sum(divmod(2 * x, 10)) for x in digits[1::2])) % 10 == 0:
            return n
    raise AssertionError


def mobile_forms(n: str) -> list[str]:
    a, b, c = n[:3], n[3:7], n[7:]
    return [
        n,
        f"+86{n}",
        f"+86 {n}",
        f"+86-{a}-{b}-{c}",
        f"0086 {n}",
        f"86-{n}",
        f"(+86){n}",
        f"{a}-{b}-{c}",
        f"{a} {b} {c}",
        f"{a}.{b}.{c}",
        f"{a}_{b}_{c}",
        f"{a} {b}{c}",
        f"{a}{b} {c}",
        f"{a}-{b}{c}",
        f"({a}) {b}-{c}",
        fullwidth(n),
        fullwidth(f"+86 {a} {b} {c}"),
        f"{a}\u200b{b}\u200b{c}",
        f"{a}\u2060{b}{c}",
        f"{a}\u00a0{b}\u00a0{c}",
        f"{a}\u3000{b}\u3000{c}",
        f"+86 {a}.{b}.{c}",
        f"1{ZW[2]}{n[1:]}",
        f"{a}-{b} {c}",
    ]


def main() -> None:
    rnd = random.Random(15)
    rows: list[dict] = []

    def add(lang: str, kind: str | None, text: str, secret: str | None = None) -> None:
        rows.append({"id": len(rows), "lang": lang, "kind": kind, "text": text, "secret": secret})

    zh_ctx = ["手机号{}，明天复诊。", "请联系{}转交资料", "紧急联系人电话：{}。", "我的号码是{}，微信同号"]
    en_ctx = ["Call me on {} tomorrow.", "My cell is {}, text first.", "Contact: {} (after 6pm)"]
    numbers = ["13812345678", "15987654321", "17600001111", "19912348765", "13500135000"]
    for i, form in enumerate(mobile_forms("13812345678")):
        ctx = (zh_ctx + en_ctx)[i % 7]
        add("zh" if i % 7 < 4 else "en", "cn_mobile", ctx.format(form), form)
    for n in numbers[1:]:
        forms = mobile_forms(n)
        for form in rnd.sample(forms, 4):
            ctx = rnd.choice(zh_ctx + en_ctx)
            add("zh" if ctx in zh_ctx else "en", "cn_mobile", ctx.format(form), form)

    ids = [
        id_with_check(p)
        for p in ("11010119900307451", "44030619851231002", "32010219770101123", "51010719881212003")
    ]
    x_id = next(
        id_with_check(f"11010119900307{n:03d}")
        for n in range(1000)
        if id_with_check(f"11010119900307{n:03d}").endswith("X")
    )
    ids.append(x_id)
    for cid in ids:
        for form, lang, ctx in (
            (cid, "zh", "身份证号：{}，请核对。"),
            (cid.lower(), "en", "ID number {} on the form"),
            (f"{cid[:6]} {cid[6:14]} {cid[14:]}", "zh", "证件号码 {} 已登记"),
            (fullwidth(cid), "zh", "身份证{}"),
            (cid[:9] + "\u200b" + cid[9:], "en", "national id: {}"),
        ):
            add(lang, "cn_id", ctx.format(form), form)

    cards = [
        "4111111111111111",
        "5500005555555559",
        "378282246310005",
        luhn_complete("621700123456789012"),
        luhn_complete("622202100112345678"),
        luhn_complete("453201511283036"),
        luhn_complete("222100000000000"),
    ]
    for card in cards:
        g = " ".join(card[i : i + 4] for i in range(0, len(card), 4))
        for form, lang, ctx in (
            (card, "zh", "卡号{}，有效期12/28"),
            (g, "en", "card {} on file"),
            (g.replace(" ", "-"), "en", "Charge {}."),
            (fullwidth(card), "zh", "银行卡：{}"),
        ):
            add(lang, "bank_card", ctx.format(form), form)

    emails = [
        "zhang.san+lab@hospital.example.com.cn",
        "li_si@example.org",
        "Jane.Doe@example.co.uk",
        "ops@corp.example",
    ]
    for e in emails:
        add("zh", "email", f"邮箱{e}，抄送主管。", e)
        add("en", "email", f"Send it to {e} please", e)
    add("zh", "email", "邮箱：wang.wu＠example.com", "wang.wu＠example.com")
    add("en", "email", "mail ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ now", "ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ")

    jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1c2VyLTEiLCJpc3MiOiJodHRwczovL2lkcCJ9.c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
    secrets = [
        ("sk-llm-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v", "en", "my key is {} can you debug"),
        ("sk-llm-xY9_zz-8QwErTyUiOpAsDfGhJkLzXcVbNm1234", "zh", "这是我的密钥 {} 帮我看看为什么401"),
        ("sk-proj-abcDEF1234567890ghijKLMNOP", "en", "OPENAI_API_KEY={}"),
        (jwt, "en", "Authorization: Bearer {}"),
        (jwt, "zh", "令牌是{}，过期了吗"),
        ("AKIAIOSFODNN7EXAMPLE", "en", "aws key {} in the config"),
        ("ASIAY34FZKBOKMUTVV7A", "en", "temporary creds {} leaked"),
        ("LTAI5tQ9bZxYpW3kRfVnMh2J", "zh", "阿里云AccessKey ID：{}"),
        ("AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE", "zh", "腾讯云 SecretId {}"),
        ("AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "en", "maps key {}"),
        ("ghp_1234567890abcdefghijABCDEFGHIJklmnop", "en", "token {} for the CI"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "en", "use {} to clone"),
        ("glpat-AbCdEfGhIjKlMnOpQrSt", "en", "gitlab {}"),
        ("xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "en", "slack bot {}"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "en", "stripe {}"),
        ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "en", "hugging face {}"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1abc\n-----END RSA PRIVATE KEY-----",
            "en",
            "key:\n{}\nthanks",
        ),
    ]
    for sec, lang, ctx in secrets:
        add(lang, "secret", ctx.format(sec), sec)
    for label, val, lang in (
        ("password=", "Tr0ub4dor&3xyz", "en"),
        ("api_key: ", "f3a9c2e1b7d84f0a", "en"),
        ("密码：", "Zhang@2024!Secure", "zh"),
        ("口令:", "P@ssw0rd123456", "zh"),
        ('"secret": "', "k8s-sa-3f2a9c0d7e", "en"),
        ("DB_PASSWORD=", "hunter2-hunter2", "en"),
    ):
        add(
            lang,
            "secret",
            f"config {label}{val} in prod" if lang == "en" else f"配置里{label}{val}，别外传",
            val,
        )

    for ph, lang, ctx in (
        ("(415) 555-2671", "en", "Call me at {} today"),
        ("+44 20 7946 0958", "en", "London office {}"),
        ("415-555-2671", "en", "Office: {}"),
        ("415.555.2672", "en", "fax {}"),
        ("010-62345678", "zh", "门诊座机{}转分机"),
        ("0755-1234567", "zh", "深圳办公室 {}"),
        ("+1 212 555 0187", "en", "NY: {}"),
        ("(010)62345678", "zh", "总机{}"),
    ):
        add(lang, "phone", ctx.format(ph), ph)
    for ip, lang in (
        ("192.168.10.23", "zh"),
        ("10.0.0.1", "en"),
        ("2001:db8::8a2e:370:7334", "en"),
        ("172.16.5.4", "zh"),
    ):
        add(lang, "ip", (f"登录自 {ip}，请核查" if lang == "zh" else f"request from {ip} blocked"), ip)

    negatives_zh = [
        "版本 1.2.3，时间 12:30:45，订单号20231129000001，金额 13800 元",
        "会议定在2024年5月1日下午3点，地点在1203会议室。",
        "本季度营收同比增长12.5%，达到3.2亿元。",
        "请在2024-06-30之前提交报告，逾期不候。",
        "快递单号 SF1234567890123 已签收。",
        "流水号 138123456789 已登记",
        "邮编 100080，北京市海淀区。",
        "第三章第12节讲的是动态规划。",
        "这台服务器有 64 核 CPU 和 512 GB 内存。",
        "温度 36.5℃，血压 120/80 mmHg，心率 72 次/分。",
        "商品编号 6901234567892 是条形码，不是卡号。",
        "航班 CA1234 于 08:45 起飞，座位 32A。",
        "请输入密码后点击登录。",
        "忘记密码？请联系管理员重置。",
        "这个 token 数量大约是 4096。",
        "Python 3.11.7 和 Node 20.10.0 都已安装。",
        "发票号码 04400123，开票日期 2024.03.15。",
        "身份证号码一共有18位，最后一位是校验码。",
        "银行卡号通常是16到19位数字。",
        "手机号码是11位，以1开头。",
        "房价每平方米 58000 元，总价 560 万。",
        "文件大小 1,048,576 字节。",
        "学号 2021001234，班级 3 班。",
        "经纬度 39.9042, 116.4074 是北京。",
        "工单 #45821 已关闭。",
        "用户 ID 是 u_8f3a2c，不是手机号。",
        "哈希值 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "提交 9fceb02d0ae598e95dc970b74767f19372d61af8 修复了这个问题。",
        "请求编号 7d9f2e1a-4b3c-4a5d-9e8f-1a2b3c4d5e6f 超时。",
        "倒计时 00:15:30，准备上线。",
        "比分 3:2，加时赛结束。",
        "分辨率 1920x1080，刷新率 144Hz。",
        "利率 3.85%，期限 30 年。",
        "合同编号 HT-2024-0815-003 已归档。",
        "药品批号 20240312，有效期至 2026 年。",
        "这段代码的时间复杂度是 O(n log n)。",
        "max_tokens=128，temperature=0.7。",
        "第 138 页到第 1234 页是附录。",
        "订单 1001 至 1099 已发货。",
        "库存还有 13800 件，单价 12.99 元。",
        "电话会议号码稍后通知。",
        "邮件主题：关于 Q3 预算的说明",
        "模型 qwen2.5-7b-instruct 已上线。",
        "时间戳 1701234567890 对应 2023 年 11 月。",
        "ISBN 978-7-111-54742-6 是这本书的编号。",
        "坐标 (120, 340) 到 (560, 780)。",
        "密钥轮换周期为 90 天。",
        "口令长度至少 12 位。",
        "IP 地址段请填写 CIDR 格式。",
        "端口 8080 和 9091 已开放。",
    ]
    negatives_en = [
        "The meeting is at 10:30, room 1203, 2024-05-01.",
        "Model v2.1.0 scored 98.76 on the benchmark",
        "Revenue grew 12.5% year over year to $3.2 billion.",
        "Order #20231129000001 shipped on 2024-06-01.",
        "Tracking number 1Z999AA10123456784 is in transit.",
        "Please reset your password using the link we sent.",
        "The token limit is 4096 for this model.",
        "Set max_tokens=256 and temperature=0.2.",
        "Python 3.11.7 is required; pip 24.0 works.",
        "The file is 1,048,576 bytes long.",
        "Coordinates 40.7128, -74.0060 are New York.",
        "Ticket #45821 was closed yesterday.",
        "Commit 9fceb02d0ae598e95dc970b74767f19372d61af8 fixed it.",
        "Request 7d9f2e1a-4b3c-4a5d-9e8f-1a2b3c4d5e6f timed out.",
        "SHA-256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "The score was 3:2 after extra time.",
        "Resolution 1920x1080 at 144Hz.",
        "Interest rate 3.85% over 30 years.",
        "Contract HT-2024-0815-003 is archived.",
        "Batch 20240312 expires in 2026.",
        "Complexity is O(n log n) on average.",
        "Pages 138 to 1234 are the appendix.",
        "Orders 1001 through 1099 have shipped.",
        "We have 13800 units at $12.99 each.",
        "The dial-in number will follow.",
        "Subject: Q3 budget notes",
        "Deploy qwen2.5-7b-instruct to staging.",
        "Timestamp 1701234567890 is in November 2023.",
        "ISBN 978-0-13-468599-1 is the textbook.",
        "Point (120, 340) to (560, 780).",
        "Keys rotate every 90 days.",
        "Passwords must be at least 12 characters.",
        "Use CIDR notation for the IP range.",
        "Ports 8080 and 9091 are open.",
        "Flight UA 1234 departs at 08:45 from gate 32A.",
        "Temperature 98.6F, blood pressure 120/80.",
        "The API key header is x-api-key.",
        "Our secret sauce is the prefix cache.",
        "The sk-learn docs cover it.",
        "Employee number E-10293 joined in 2019.",
        "Barcode 0012345678905 on the shelf.",
        "Section 4.2.1 explains the algorithm.",
        "Kernel 6.8.0-45-generic was installed.",
        "The invoice total is 1,299.00 USD.",
        "It happened between 09:00 and 17:30 UTC.",
        "Pi is about 3.14159265358979.",
        "Latency p99 was 512 ms at 1200 rps.",
        "Replica 3 of 8 is draining.",
        "Use ssh on port 22 and https on 443.",
        "Year 2024, quarter 3, week 38.",
        "The api_key field is required.",
        "token: abc",
    ]
    for t in negatives_zh:
        add("zh", None, t)
    for t in negatives_en:
        add("en", None, t)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    pos = sum(1 for r in rows if r["kind"])
    print(f"{OUT}: {pos} positives, {len(rows) - pos} negatives")


if __name__ == "__main__":
    main()
