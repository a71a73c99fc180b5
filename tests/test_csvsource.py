"""The CSV as untrusted input: its address, its size, its encoding, and what messages show."""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from ml import csvsource
from ml.csvsource import SourceLimits, read_bytes, to_utf8
from ml.errors import PipelineError
from ml.ingest import find_columns, ingest, parse_csv, validate_rows
from tests.helpers import serving

ROWS = "url,label\nhttp://a.example/1.jpg,Positive\nhttp://a.example/é.jpg,Négatif\n"
LOOPBACK = SourceLimits(allow_networks=("127.0.0.0/8",), csv_deadline=3.0)


@pytest.mark.parametrize(
    "codec", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_a_byte_order_mark_picks_the_encoding(codec: str) -> None:
    bom = {
        "utf-16-le": codecs.BOM_UTF16_LE,
        "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32-le": codecs.BOM_UTF32_LE,
        "utf-32-be": codecs.BOM_UTF32_BE,
    }.get(codec, b"")
    data = bom + ROWS.encode(codec)
    assert to_utf8(data) == ROWS.encode()
    frame = parse_csv(data)
    assert list(frame.columns) == ["url", "label"] and frame["url"][1].endswith("é.jpg")


def test_utf16_without_a_bom_is_named() -> None:
    with pytest.raises(PipelineError, match="UTF-16 or UTF-32 without a BOM"):
        to_utf8(ROWS.encode("utf-16-le"))


def test_an_invalid_byte_names_its_record_and_is_never_replaced() -> None:
    data = (
        b"url,label\nhttp://a/1.jpg,Positive\nhttp://a/2.jpg,Neutral\nhttp://a/3.jpg,Positive\n"
    ).replace(b"/3.jpg", b"/3\xff.jpg")
    with pytest.raises(PipelineError) as info:
        to_utf8(data, "images.csv")
    message = str(info.value)
    assert "images.csv is not valid utf-8" in message and "data record 3" in message
    assert "--encoding" in message and "\ufffd" not in message


def test_an_invalid_byte_across_a_block_boundary_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csvsource, "_CHECK_BLOCK", 16)
    good = ("url,label\n" + "".join(f"http://a/{i}é.jpg,Positive\n" for i in range(20))).encode()
    assert to_utf8(good) == good  # é split across blocks is fine
    bad = good + b"http://a/x\xc3.jpg,Neutral\n"
    with pytest.raises(PipelineError, match="data record 21"):
        to_utf8(bad)


def test_an_encoding_can_be_named() -> None:
    data = ROWS.encode("cp1252")
    with pytest.raises(PipelineError, match="not valid utf-8"):
        to_utf8(data)
    assert to_utf8(data, encoding="cp1252") == ROWS.encode()
    with pytest.raises(PipelineError, match="unknown --encoding"):
        to_utf8(data, encoding="klingon")


def test_local_files_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_bytes(ROWS.encode() * 100)
    with pytest.raises(PipelineError, match="larger than the 100 bytes allowed"):
        read_bytes(str(path), SourceLimits(max_bytes=100))
    with pytest.raises(PipelineError, match="unsupported CSV address"):
        read_bytes("file:///etc/passwd")


# ------------------------------------------------------------------ CSVs fetched over http


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        routes = {
            "/ok.csv": (200, ROWS.encode(), {}),
            "/to-metadata.csv": (302, b"", {"Location": "http://169.254.169.254/latest/"}),
            "/to-loopback.csv": (302, b"", {"Location": "http://127.0.0.1:1/x.csv"}),
            "/page.csv": (200, b"TOP-SECRET-FIRST-LINE;nothing,else\n\x00\x01", {}),
            "/big.csv": (200, b"url,label\n" + b"x" * 5000, {}),
        }
        if self.path == "/slow.csv":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(100):
                time.sleep(0.1)
                try:
                    self.wfile.write(b"u")
                    self.wfile.flush()
                except OSError:
                    return
            return
        status, body, headers = routes.get(self.path, (404, b"gone", {}))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def csv_server() -> Iterator[str]:
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), _Handler)) as base:
        yield base


def test_a_csv_url_goes_through_the_address_policy(csv_server: str) -> None:
    assert read_bytes(f"{csv_server}/ok.csv", LOOPBACK) == ROWS.encode()
    with pytest.raises(PipelineError, match="blocked"):
        read_bytes(f"{csv_server}/ok.csv")  # loopback is not opened by default
    with pytest.raises(PipelineError, match=r"blocked.*169\.254\.169\.254"):
        read_bytes(f"{csv_server}/to-metadata.csv", LOOPBACK)


def test_a_csv_url_is_capped_and_bounded_in_time(csv_server: str) -> None:
    with pytest.raises(PipelineError, match="larger than the 1000 bytes allowed"):
        read_bytes(
            f"{csv_server}/big.csv", SourceLimits(max_bytes=1000, allow_networks=("127.0.0.0/8",))
        )
    started = time.monotonic()
    with pytest.raises(PipelineError, match="timeout"):
        read_bytes(
            f"{csv_server}/slow.csv",
            SourceLimits(csv_deadline=1.0, allow_networks=("127.0.0.0/8",)),
        )
    assert time.monotonic() - started < 2.5


@pytest.mark.integration
def test_nothing_fetched_is_echoed(csv_server: str, store_uri: str) -> None:
    with pytest.raises(PipelineError) as info:
        ingest(f"{csv_server}/page.csv", store_uri, limits=LOOPBACK)
    assert "TOP-SECRET" not in str(info.value)
    data = to_utf8(b"SECRET_COLUMN,other\nx,y\n")
    header = csvsource.read_header(data)
    with pytest.raises(PipelineError) as hidden:
        find_columns(header, show=False)
    assert "SECRET_COLUMN" not in str(hidden.value) and "2 columns" in str(hidden.value)


@pytest.mark.integration
def test_s3_objects_are_capped(store_uri: str, store: object) -> None:
    from ml.storage import ObjectStore, S3Uri

    assert isinstance(store, ObjectStore)
    uri = S3Uri.parse(store_uri).child("input", "big.csv")
    store.put_bytes(uri, ROWS.encode() * 50)
    with pytest.raises(PipelineError, match="larger than the 100 bytes"):
        read_bytes(str(uri), SourceLimits(max_bytes=100), store)


def test_rows_are_numbered_across_chunks() -> None:
    lines = ["url,label"] + [f"http://a/{i}.jpg,Positive" for i in range(1, 8)]
    lines[5] = "http://a/1.jpg,Positive"  # record 5 repeats record 1
    lines[6] = "ftp://a/6.jpg,Positive"
    from ml.ingest import read_records

    records, rejected, _, total = read_records("\n".join(lines).encode(), "t.csv", chunk_rows=2)
    assert total == 7 and len(records) == 5
    assert rejected[["row", "reason"]].values.tolist() == [
        [5, "duplicate_url"],
        [6, "unsupported_scheme"],
    ]
    assert rejected["detail"][0] == "same URL as row 1"
    frame = parse_csv("\n".join(lines).encode())
    same, same_rejected = validate_rows(frame, find_columns(list(frame.columns)))
    pd.testing.assert_frame_equal(same, records, check_dtype=False)
    pd.testing.assert_frame_equal(same_rejected, rejected, check_dtype=False)
