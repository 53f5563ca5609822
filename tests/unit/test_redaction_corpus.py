"""The redaction corpus (tests/data/redaction_corpus.jsonl, written by scripts/make_redaction_corpus.py):
every positive's written form is replaced by its detector; nothing in a negative is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.audit.redact import Redactor, normalize
from gateway.outcome import Outcome

ROWS = [
    json.loads(line)
    for line in (Path(__file__).resolve().parent.parent / "data" / "redaction_corpus.jsonl")
    .read_text("utf-8")
    .splitlines()
]
POSITIVES = [r for r in ROWS if r["kind"]]
NEGATIVES = [r for r in ROWS if not r["kind"]]
KINDS = {"ip": {"ipv4", "ipv6"}}


def test_corpus_size_and_languages() -> None:
    assert len(POSITIVES) >= 100 and len(NEGATIVES) >= 100
    for rows in (POSITIVES, NEGATIVES):
        assert {r["lang"] for r in rows} == {"zh", "en"}


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


@pytest.mark.parametrize("row", POSITIVES, ids=lambda r: f"{r['id']}-{r['kind']}")
def test_positive_is_redacted(redactor: Redactor, row: dict) -> None:
    out, counts = redactor.redact_counted(row["text"])
    assert KINDS.get(row["kind"], {row["kind"]}) & set(counts), (out, counts)
    assert normalize(row["secret"]) not in out and row["secret"] not in out, out


@pytest.mark.parametrize("row", NEGATIVES, ids=lambda r: str(r["id"]))
def test_negative_is_left_alone(redactor: Redactor, row: dict) -> None:
    out, counts = redactor.redact_counted(row["text"])
    assert counts == {} and out == normalize(row["text"]), out


def test_normalize_keeps_chinese_punctuation() -> None:
    assert normalize("手机：１３８\u200b１２３４　５６７８，好。") == "手机：1381234 5678，好。"
    assert normalize("plain ascii") == "plain ascii"


def test_identifiers_in_records_are_redacted_under_every_policy() -> None:
    from gateway.audit.record import build_record
    from gateway.auth.principal import Principal
    from gateway.context import RequestContext

    for content in ("none", "hash", "redacted"):
        c = RequestContext("req-1", "(unmatched)", "GET", "203.0.113.7")
        c.principal = Principal(
            subject="１３８ １２３４ ５６７８", tenant="t", kind="jwt", key_id="https://idp.example"
        )
        c.model = "model-for-13812345678"
        c.extra["url_path"] = "/v1/users/138.1234.5678/sk-llm-A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
        c.status, c.decision = 404, Outcome.NOT_FOUND
        rec = build_record(c, content, Redactor() if content == "redacted" else None)
        text = json.dumps(rec, ensure_ascii=False)
        for leaked in ("13812345678", "1234", "5678", "sk-llm-A1b2"):
            assert leaked not in text, (content, leaked, text)
        assert rec["user"]["id"] == "jwt:https://idp.example#[PHONE]"
        assert len(rec["user"]["hash"]) == 64  # the same caller's records still correlate
        assert rec["url"]["path"].startswith("/v1/users/[PHONE]/[SECRET]")
    plain = RequestContext("req-2", "/v1/models", "GET", "203.0.113.7")
    plain.principal = Principal(subject="svc-a", tenant="t", kind="api_key", key_id="svc-a")
    assert build_record(plain)["user"] == {"id": "key:svc-a"}
