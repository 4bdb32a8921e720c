"""The reads the console needs, through real HTTP: the feedback queue with the answer, segment
and version of each signal, and the thumbs-up rate per adapter version over time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import select

from service.storage.tables import Completion
from tests.service.conftest import Live

OPS = {"X-Operator": "olga"}


def test_feedback_queue_shows_the_answer_and_filters_by_segment_and_version(live: Live) -> None:
    answer = live.chat([{"role": "user", "content": "What is up?"}])
    other = live.chat([{"role": "user", "content": "And down?"}])
    assert live.feedback(completion_id=answer["id"], rating=-1, comment="meh").status_code == 201
    assert live.feedback(completion_id=other["id"], rating=1).status_code == 201

    rows = live.http.get("/v1/operator/feedback", headers=OPS).json()["data"]
    assert [r["completion_id"] for r in rows] == [other["id"], answer["id"]]
    assert rows[1]["answer"] == answer["choices"][0]["message"]["content"]
    assert rows[1]["prompt"] == "What is up?"
    assert (rows[1]["segment"], rows[1]["adapter_version"]) == ("default", None)

    def ids(**params: str) -> list[str]:
        r = live.http.get("/v1/operator/feedback", params=params, headers=OPS)
        assert r.status_code == 200, r.text
        return [x["completion_id"] for x in r.json()["data"]]

    assert ids(segment="default", has_comment="true") == [answer["id"]]
    assert ids(segment="support") == []
    assert ids(adapter_version="base", rating="1") == [other["id"]]
    assert ids(adapter_version="default@v1") == []


def test_thumbs_rate_per_version_in_time_buckets(live: Live) -> None:
    answers = [live.chat([{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    # Two of the answers are relabelled as a version's, as if it had been serving them.
    with live.session() as s:
        for a in answers[2:]:
            row = s.get(Completion, a["id"])
            row.adapter_version = "default@v1"
            s.add(row)
        s.commit()
    for a, rating in zip(answers, (1, -1, 1, 1), strict=True):
        assert live.feedback(completion_id=a["id"], rating=rating).status_code == 201
    assert live.feedback(completion_id=answers[0]["id"], type="edit", text="x").status_code == 201

    r = live.http.get("/v1/operator/stats/thumbs", params={"bucket_seconds": 86400}, headers=OPS)
    assert r.status_code == 200, r.text
    stats = r.json()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    by_version = {s["version"]: s["points"] for s in stats["data"]}
    assert set(by_version) == {"base", "default@v1"}
    [base] = by_version["base"]
    [v1] = by_version["default@v1"]
    assert (base["up"], base["down"], base["rate"]) == (1, 1, 0.5)
    assert (v1["up"], v1["down"], v1["rate"]) == (2, 0, 1.0)
    assert datetime.fromisoformat(base["t"]) == today  # whole days, on the clock's

    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    r = live.http.get("/v1/operator/stats/thumbs", params={"since": later}, headers=OPS)
    assert r.json()["data"] == []
    r = live.http.get("/v1/operator/stats/thumbs", params={"segment": "support"}, headers=OPS)
    assert r.json()["data"] == []
    r = live.http.get("/v1/operator/stats/thumbs", params={"bucket_seconds": 0}, headers=OPS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "bucket_seconds"
    with live.session() as s:  # nothing was written by the reads
        assert len(s.exec(select(Completion)).all()) == 4


def test_widget_config_and_pages(live: Live) -> None:
    assert live.http.get("/v1/widget/config").json() == {"compare_every": 0}
    js = live.http.get("/widget.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    demo = live.http.get("/demo", params={"segment": 'x"><script>alert(1)</script>'}).text
    assert 'data-segment="x&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in demo
    assert "<script>alert(1)" not in demo
    assert live.http.get("/console").status_code == 200
    assert live.http.get("/web/vendor/uPlot.iife.min.js").status_code == 200
    assert live.http.get("/web/nope.js").status_code == 404
