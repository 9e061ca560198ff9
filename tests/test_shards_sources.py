"""`vlm shards build` from parquet/arrow tables (incl. HF image structs) and img2dataset output folders;
shard streaming from object stores: fsspec retries and credential errors (custom fsspec filesystems, no
network)."""
import io
import json
import sys
import tarfile

import pytest
from PIL import Image

from vlm.cli import main
from vlm.errors import DataError

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def _jpeg(colour=(200, 30, 30), size=(20, 14)):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, "JPEG")
    return b.getvalue()


def _read_back(out, task="image"):
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    cfg = DataConfig(shards=str(out), batch_size=4, num_workers=0, shuffle_buffer=0, drop_last=False)
    stream = make_loader(cfg, ImagePreprocess(image_size=8), None, task=task)
    got = {}
    for b in stream:
        for k, c in zip(b["key"], b["captions"]):
            got[k] = c
    return got, stream


def _manifest(out):
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ tables
@pytest.fixture()
def table_dir(tmp_path):
    d = tmp_path / "t"
    (d / "img").mkdir(parents=True)
    (d / "img" / "a.jpg").write_bytes(_jpeg())
    (d / "img" / "b.jpg").write_bytes(_jpeg((0, 0, 200)))
    return d


def test_parquet_paths_urls_and_languages(table_dir, tmp_path):
    rows = {"url": ["img/a.jpg", "https://example.com/x.jpg", "https://example.com/b.jpg", "img/missing.jpg",
                    str(table_dir / "img" / "b.jpg")],
            "image_path": [None, None, "img/b.jpg", None, None],
            "caption": [["a red box"], ["remote"], ["a blue box"], ["gone"], ["zwei", "Bilder"]],  # lists
            "lang": ["en", "en", "EN", "en", "de-DE"],
            "similarity": [0.3, 0.1, float("nan"), 0.2, 0.5]}
    pq.write_table(pa.table(rows), table_dir / "part-0.parquet")
    out = tmp_path / "out"
    assert main(["shards", "build", str(table_dir / "part-0.parquet"), "--out", str(out), "--quiet"]) == 0
    m = _manifest(out)
    assert m["source"]["kind"] == "table" and m["source"]["url_col"] == "url"
    assert m["num_samples"] == 3 and m["skipped_reasons"] == {"remote_image": 1, "missing_image": 1}
    remote = next(s for s in m["skipped"] if s["reason"] == "remote_image")
    assert "not downloaded" in remote["detail"] and remote["row"] == 2
    got, _ = _read_back(out)
    assert sorted(got.values(), key=str) == sorted([{"en": ["a red box"]}, {"en": ["a blue box"]},
                                                    {"de": ["zwei", "Bilder"]}], key=str)
    with tarfile.open(out / "shard-000000.tar") as t:
        metas = [json.loads(t.extractfile(x).read()) for x in t.getmembers() if x.name.endswith(".json")]
    assert metas[1]["url"] == "https://example.com/b.jpg" and metas[1]["similarity"] is None
    assert metas[0]["similarity"] == 0.3


def test_hf_image_structs_and_configurable_columns(tmp_path):
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": _jpeg(), "path": "0001.jpg"}, {"bytes": _jpeg((0, 90, 0)), "path": None},
                           {"bytes": None, "path": "nowhere.jpg"}, {"bytes": b"not an image", "path": "bad.jpg"}],
                          type=img),
        "text": ["eine Katze", "ein Hund", "nichts", "kaputt"],
        "language": ["de", "de", "de", "de"]})
    src = tmp_path / "hf"
    src.mkdir()
    pq.write_table(table.slice(0, 2), src / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(2), src / "train-00001-of-00002.parquet")
    out = tmp_path / "out"
    assert main(["shards", "build", str(src), "--format", "table", "--url-col", "image", "--caption-col", "text",
                 "--lang-col", "language", "--out", str(out), "--quiet"]) == 0
    m = _manifest(out)
    assert m["num_samples"] == 2 and m["source"]["files"] == 2
    assert m["skipped_reasons"] == {"missing_image": 1, "corrupt_image": 1}
    got, _ = _read_back(out)
    assert sorted(c["de"][0] for c in got.values()) == ["ein Hund", "eine Katze"]
    # the default image column list finds "image" too; a folder of parquet files is detected without --format
    out2 = tmp_path / "out2"
    assert main(["shards", "build", str(src), "--caption-col", "text", "--lang", "de", "--out", str(out2),
                 "--quiet"]) == 0
    assert _manifest(out2)["num_samples"] == 2


def test_arrow_ipc_file_and_stream(table_dir, tmp_path):
    t = pa.table({"image_path": ["img/a.jpg", "img/b.jpg"], "caption": ["rot", "blau"]})
    with pa.ipc.new_file(str(table_dir / "data.arrow"), t.schema) as w:
        w.write_table(t)
    with pa.ipc.new_stream(str(table_dir / "cache.arrow"), t.schema) as w:  # HF datasets' cache layout
        w.write_table(t)
    for name in ("data.arrow", "cache.arrow"):
        out = tmp_path / name
        assert main(["shards", "build", str(table_dir / name), "--lang", "de", "--out", str(out), "--quiet"]) == 0
        assert _manifest(out)["num_samples"] == 2 and _manifest(out)["source"]["url_col"] == "image_path"


def test_table_column_errors(table_dir, tmp_path, capsys):
    pq.write_table(pa.table({"url": ["img/a.jpg"], "caption": ["x"]}), table_dir / "t.parquet")
    pq.write_table(pa.table({"file": ["img/a.jpg"], "caption": ["x"]}), table_dir / "u.parquet")
    out = ["--out", str(tmp_path / "o")]
    for argv, msg in [([str(table_dir / "t.parquet")], "no language column 'lang'; name it with --lang-col"),
                      ([str(table_dir / "t.parquet"), "--lang", "en", "--caption-col", "txt"],
                       "no caption column 'txt'"),
                      ([str(table_dir / "t.parquet"), "--lang", "en", "--url-col", "img"], "no column 'img'"),
                      ([str(table_dir / "u.parquet"), "--lang", "en"], "no image column"),
                      ([str(table_dir / "t.parquet"), "--lang", "zz"], "--lang: unknown language")]:
        assert main(["shards", "build"] + argv + out) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_missing_pyarrow_names_the_extra(table_dir, tmp_path, monkeypatch):
    from vlm.data_recipes.sources import build_from_table

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"pip install 'vlm\[data\]'"):
        build_from_table(table_dir / "x.parquet", tmp_path / "o", lang="en")


# ------------------------------------------------------------------------------------------ img2dataset
def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _i2d_json(key, caption, **kw):
    return json.dumps({"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                       "error_message": None, "width": 20, "height": 14, "original_width": 40, **kw}).encode()


def test_img2dataset_folder_is_resharded_and_validated(tmp_path):
    d = tmp_path / "i2d"
    d.mkdir()
    _tar(d / "00000.tar", {"000000000.jpg": _jpeg(), "000000000.txt": b"a red box",
                           "000000000.json": _i2d_json("000000000", "a red box"),
                           "000000001.jpg": _jpeg((0, 0, 200)), "000000001.txt": b"ein blauer Kasten",
                           "000000001.json": _i2d_json("000000001", "ein blauer Kasten", lang="de"),
                           "000000002.jpg": b"\xff\xd8 broken", "000000002.json": _i2d_json("000000002", "x"),
                           "000000003.txt": b"no image", "000000003.json": _i2d_json("000000003", "no image")})
    whole = _tar(tmp_path / "whole.tar", {"000010000.jpg": _jpeg(), "000010000.txt": b"caption only in txt",
                                          "000010001.jpg": _jpeg((9, 9, 9)), "000010001.txt": b"lost"})
    with tarfile.open(whole) as t:
        cut = t.getmember("000010001.jpg").offset_data + 50
    (d / "00001.tar").write_bytes(whole.read_bytes()[:cut])  # truncated inside the second sample's image
    pq.write_table(pa.table({"url": ["u"], "status": ["success"]}), d / "00000.parquet")
    (d / "00000_stats.json").write_text(json.dumps({"count": 10, "successes": 4, "failed_to_download": 6}))
    (d / "00001_stats.json").write_text(json.dumps({"count": 2, "successes": 2, "failed_to_download": 0}))
    out = tmp_path / "out"
    assert main(["shards", "build", str(d), "--lang", "en", "--out", str(out), "--quiet"]) == 0
    m = _manifest(out)
    assert m["source"]["kind"] == "img2dataset" and m["source"]["tars"] == 2 and m["source"]["parquet_files"] == 1
    assert m["source"]["stats"] == {"count": 12, "successes": 6, "failed_to_download": 6}
    assert m["num_samples"] == 3, m["skipped"]
    assert m["skipped_reasons"] == {"corrupt_image": 1, "missing_image": 1, "truncated_tar": 1}
    got, stream = _read_back(out)
    assert sorted(map(json.dumps, got.values())) == sorted(map(json.dumps, [
        {"en": ["a red box"]}, {"de": ["ein blauer Kasten"]}, {"en": ["caption only in txt"]}]))
    with tarfile.open(out / "shard-000000.tar") as t:
        meta = json.loads(t.extractfile("000000000.json").read())
    assert meta["source_key"] == "000000000" and meta["source_shard"] == "00000.tar"
    assert meta["url"].startswith("https://") and "status" not in meta and meta["original_width"] == 40


def test_img2dataset_without_language_skips_as_missing_lang(tmp_path):
    d = tmp_path / "i2d"
    d.mkdir()
    _tar(d / "00000.tar", {"k.jpg": _jpeg(), "k.json": _i2d_json("k", "a box")})
    out = tmp_path / "out"
    assert main(["shards", "build", str(d), "--format", "img2dataset", "--out", str(out), "--quiet"]) == 1
    assert _manifest(out)["skipped_reasons"] == {"missing_lang": 1}


# ------------------------------------------------------------------------------------------ fsspec
class _Flaky:
    """Class-level plan for the test filesystem: errors to raise on the next opens, then succeed."""
    errors: list = []
    opens = 0


def _flaky_fs():
    from fsspec.implementations.memory import MemoryFileSystem

    class FlakyFS(MemoryFileSystem):
        protocol = ("flaky",)

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("flaky://"))

        def _open(self, path, mode="rb", **kw):
            _Flaky.opens += 1
            if _Flaky.errors:
                raise _Flaky.errors.pop(0)
            return super()._open(path, mode, **kw)

    return FlakyFS


@pytest.fixture()
def flaky(monkeypatch):
    import fsspec

    from vlm.data import shards

    fsspec.register_implementation("flaky", _flaky_fs(), clobber=True)
    waits = []
    monkeypatch.setattr(shards, "_sleep", waits.append)
    _Flaky.errors, _Flaky.opens = [], 0
    fs = fsspec.filesystem("flaky")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in {"s1.jpg": _jpeg(), "s1.json": json.dumps({"captions": {"en": ["a box"]}}).encode(),
                           "s2.jpg": _jpeg((1, 2, 3)), "s2.txt": b"zwei", "s2.json": b'{"lang": "de"}'}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with fs.open("flaky://bucket/shard-000.tar", "wb") as f:
        f.write(buf.getvalue())
    _Flaky.opens = 0
    yield waits
    fs.rm("flaky://bucket", recursive=True)


class ClientError(Exception):
    """Shaped like botocore.exceptions.ClientError (a ``response`` dict)."""

    def __init__(self, code, status):
        super().__init__(f"An error occurred ({code}) when calling the GetObject operation")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class NoCredentialsError(Exception):
    """Named like botocore's."""


def test_transient_errors_are_retried_with_backoff(flaky):
    from vlm.data.shards import open_shard

    _Flaky.errors = [OSError("connection reset"), TimeoutError("read timeout"), ClientError("SlowDown", 503)]
    with open_shard("flaky://bucket/shard-000.tar") as f:
        assert f.read(5)
    assert _Flaky.opens == 4 and flaky == [0.5, 1.0, 2.0]


def test_retries_are_bounded(flaky):
    from vlm.data import shards

    _Flaky.errors = [OSError("down")] * (shards.OPEN_RETRIES + 1)
    with pytest.raises(DataError, match=r"cannot open shard flaky://bucket/shard-000.tar after 4 attempts: OSError"):
        shards.open_shard("flaky://bucket/shard-000.tar")
    assert _Flaky.opens == 4 and len(flaky) == 3


@pytest.mark.parametrize("err", [PermissionError("Access Denied"), NoCredentialsError("Unable to locate credentials"),
                                 ClientError("AccessDenied", 403), ClientError("InvalidAccessKeyId", 403)])
def test_credential_errors_are_one_line_and_not_retried(flaky, err):
    from vlm.data.shards import ShardAccessError, open_shard

    _Flaky.errors = [err]
    with pytest.raises(ShardAccessError) as e:
        open_shard("flaky://bucket/shard-000.tar")
    msg = str(e.value)
    assert "\n" not in msg and "flaky://bucket/shard-000.tar" in msg and "access denied or no credentials" in msg
    assert "configure the credentials" in msg and _Flaky.opens == 1 and flaky == []


def test_credential_hint_names_the_store(monkeypatch):
    from vlm.data import shards

    class FS:
        def open(self, url, mode):
            raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(shards, "_fsspec_fs", lambda url: FS())
    with pytest.raises(shards.ShardAccessError, match="AWS_ACCESS_KEY_ID.*AWS_PROFILE"):
        shards.open_shard("s3://bucket/shard-000.tar")
    with pytest.raises(shards.ShardAccessError, match="GOOGLE_APPLICATION_CREDENTIALS"):
        shards.open_shard("gcs://bucket/shard-000.tar")


def test_not_found_is_not_retried(flaky):
    from vlm.data.shards import open_shard

    _Flaky.errors = [FileNotFoundError("flaky://bucket/nope.tar")]
    with pytest.raises(FileNotFoundError):
        open_shard("flaky://bucket/nope.tar")
    assert _Flaky.opens == 1 and flaky == []


def test_loader_streams_through_retries_and_stops_on_credentials(flaky):
    from vlm.data.shards import ShardAccessError
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    _Flaky.errors = [OSError("reset"), ConnectionError("refused")]
    cfg = DataConfig(shards="flaky://bucket/shard-000.tar", batch_size=2, num_workers=0, shuffle_buffer=0,
                     drop_last=False)
    batches = list(make_loader(cfg, ImagePreprocess(image_size=8), None, task="image"))
    assert [c for b in batches for c in b["captions"]] == [{"en": ["a box"]}, {"de": ["zwei"]}]
    assert len(flaky) == 2
    _Flaky.errors = [PermissionError("403 Forbidden")]
    with pytest.raises(ShardAccessError, match="flaky://bucket/shard-000.tar"):
        list(make_loader(cfg, ImagePreprocess(image_size=8), None, task="image"))
