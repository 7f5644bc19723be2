"""Publishing to a real pypiserver (htpasswd auth) through real twine, installing back with real pip."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from blackwheel.cli import release as cli_release
from blackwheel.release import index
from blackwheel.core.errors import PublishError
from blackwheel.release.publish import check_url, publish, simple_url_for, smoke_install


from tests import indexserver as h  # noqa: E402  (a real pypiserver on 127.0.0.1)
USER, PASSWORD = "alice", "pw-Zq7-never-print-me"
GOOD = {"TWINE_USERNAME": USER, "TWINE_PASSWORD": PASSWORD}
VERSION = "1.0+cu130.sm121"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with h.running_pypiserver(tmp_path_factory.mktemp("pypiserver"), {USER: PASSWORD}) as srv:
        yield srv


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """bw-pub 1.0 (VALUE 1), a different wheel of the same name (VALUE 2), placed in two wheelhouses."""
    work = tmp_path_factory.mktemp("wheels")
    one, two = h.build_wheel(work, "bw-pub", VERSION, 1), h.build_wheel(work, "bw-pub", VERSION, 2)
    return h.place(one, work / "wh1"), h.place(two, work / "wh2")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_install_and_republish(server, wheels, tmp_path, capsys):
    report = publish([wheels[0]], server.url, environ=GOOD)
    assert [w.filename for r in report.releases for w in r.uploaded] == [wheels[0].name]
    assert sha(server.packages / wheels[0].name) == sha(wheels[0])
    result = smoke_install(server.simple_url, ["bw-pub"], tmp_path / "venv")
    assert result.ok, result.log
    assert result.installed == {"bw-pub": VERSION}

    again = publish([wheels[0]], server.url, environ=GOOD)  # same bytes: nothing to do
    assert [w.filename for r in again.releases for w in r.present] == [wheels[0].name]
    assert not any(r.uploaded for r in again.releases)
    assert PASSWORD not in capsys.readouterr().out + report.summary() + again.summary()


def test_other_bytes_under_a_published_name_are_refused(server, wheels):
    publish([wheels[0]], server.url, environ=GOOD)
    with pytest.raises(PublishError) as exc:
        publish([wheels[1]], server.url, environ=GOOD)
    assert sha(wheels[0]) in str(exc.value) and sha(wheels[1]) in str(exc.value)
    assert sha(server.packages / wheels[0].name) == sha(wheels[0])


def test_a_cut_off_upload_on_the_index_is_named_as_one(server, tmp_path):
    """pypiserver writes an upload in place: killed while writing, it keeps the part it had (seen in
    tests/faults). That is not "other bytes, rebuild with a new version": it is named, one line, and
    once it is removed a rerun completes."""
    wheel = h.place(h.build_wheel(tmp_path, "bw-cut", "3.0", 1), tmp_path / "wh")
    part = server.packages / wheel.name
    part.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    with pytest.raises(PublishError) as exc:
        publish([wheel], server.url, environ=GOOD)
    message = str(exc.value)
    sizes = f"({part.stat().st_size} of {wheel.stat().st_size} bytes"
    assert f"{wheel.name} on the index is a partial upload {sizes}" in message
    assert "rebuild" not in message and "\n" not in message
    part.unlink()
    assert [w.filename for r in publish([wheel], server.url, environ=GOOD).releases for w in r.uploaded] == [wheel.name]


def test_failure_midway_reports_and_a_rerun_completes(server, tmp_path):
    plain = h.place(h.build_wheel(tmp_path, "bw-mid", "2.0", 1), tmp_path / "wh")
    tagged = plain.with_name(plain.name.replace("-2.0-", "-2.0-1-"))  # same release, build tag 1
    shutil.copyfile(plain, tagged)
    h.write_manifest(tagged)
    first, second = sorted([plain, tagged], key=lambda p: p.name)  # the order publish uploads them in
    blocker = server.packages / second.name
    blocker.mkdir()  # the server cannot store that file: it fails midway, after the first upload
    with pytest.raises(PublishError) as exc:
        publish([plain, tagged], server.url, environ=GOOD)
    message = str(exc.value)
    assert f"on the index: {first.name}" in message and f"not uploaded: {second.name}" in message
    blocker.rmdir()
    report = publish([plain, tagged], server.url, environ=GOOD)
    (release,) = report.releases
    assert [w.filename for w in release.present] == [first.name]
    assert [w.filename for w in release.uploaded] == [second.name]


def test_wrong_password_is_403_and_no_secret_is_printed(server, tmp_path, capsys):
    wheel = h.place(h.build_wheel(tmp_path, "bw-idx", "1.0+cu130.sm121", 1), tmp_path / "wh")  # never uploaded
    wrong = "wrong-Kx9-secret"
    with pytest.raises(PublishError, match="403") as exc:
        publish([wheel], server.url, environ={"TWINE_USERNAME": USER, "TWINE_PASSWORD": wrong})
    text = str(exc.value) + "".join(capsys.readouterr())
    assert wrong not in text and "wrong credentials" in text
    assert not (server.packages / wheel.name).exists()


def test_listing_that_needs_auth_uses_the_credentials(tmp_path, wheels, capsys):
    with h.running_pypiserver(tmp_path / "srv", {USER: PASSWORD}, authenticate="update,download,list") as srv:
        assert publish([wheels[0]], srv.url, environ=GOOD).releases[0].uploaded
        with pytest.raises(PublishError, match="403"):
            publish([wheels[0]], srv.url,
                    environ={"BLACKWHEEL_INDEX_USER": USER, "BLACKWHEEL_INDEX_PASSWORD": "nope-42"})
    printed = "".join(capsys.readouterr())
    assert "twine upload" in printed and PASSWORD not in printed and "nope-42" not in printed


def test_no_credentials_is_a_clear_error(server, wheels, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")
    with pytest.raises(PublishError, match="no credentials.*TWINE_USERNAME"):
        publish([wheels[0]], server.url, environ={})


def test_unreachable_index_is_a_clear_error(wheels):
    closed = f"http://127.0.0.1:{h.free_port()}/"
    with pytest.raises(PublishError, match="unreachable.*is the server running"):
        publish([wheels[0]], closed, environ=GOOD)


def test_unverified_wheel_is_refused_before_any_network(tmp_path, wheels):
    bad = h.place(wheels[0], tmp_path / "wh", verify_ok=False)
    closed = f"http://127.0.0.1:{h.free_port()}/"
    with pytest.raises(PublishError, match="did not pass verify.*--allow-unverified"):
        publish([bad], closed, environ=GOOD)


@pytest.mark.parametrize("url, message", [
    ("127.0.0.1:8080", "needs a scheme"),
    ("ftp://host/", "needs a scheme"),
    ("http://", "needs a scheme"),
    ("https://bob:hunter2@host/", "must not carry credentials"),
])
def test_bad_urls(url, message):
    with pytest.raises(PublishError, match=message) as exc:
        check_url(url)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize("upload, simple", [
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/simple/"),
    ("https://idx.example/legacy/", "https://idx.example/simple/"),
    ("https://idx.example/repository/pypi-hosted", "https://idx.example/repository/pypi-hosted/simple/"),
    ("https://idx.example/api/v4/projects/7/packages/pypi",
     "https://idx.example/api/v4/projects/7/packages/pypi/simple/"),
])
def test_simple_url_rule(upload, simple):
    assert simple_url_for(upload) == simple


def test_smoke_install_reports_a_missing_package(tmp_path, wheels):
    h.place(wheels[0], tmp_path / "wh")
    from blackwheel.release.index import build_static_index

    url = build_static_index(tmp_path / "wh").simple_url
    result = smoke_install(url, ["bw-pub", "bw-absent"], tmp_path / "venv")
    assert not result.ok and "pip" in result.failures and "bw-absent" in result.failures["pip"]


def test_cli_publish_to_a_server_refreshes_the_static_index(server, tmp_path, monkeypatch, capsys):
    wh = tmp_path / "wh"
    wheel = h.place(h.build_wheel(tmp_path, "bw-cli", "3.0", 1), wh)
    monkeypatch.setenv("TWINE_USERNAME", USER)
    monkeypatch.setenv("TWINE_PASSWORD", PASSWORD)
    parser = argparse.ArgumentParser()
    cli_release.register(parser.add_subparsers())
    args = parser.parse_args(["publish", "--wheelhouse", str(wh), "--to", server.url])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"uploaded  {wheel.name}" in printed and PASSWORD not in printed
    assert (wh / "index" / "files" / f"{wheel.name}.cdx.json").is_file()  # provenance stays beside, locally
    assert (server.packages / wheel.name).read_bytes() == wheel.read_bytes()


def test_cli_refuses_a_bad_url_before_any_work(tmp_path):
    parser = argparse.ArgumentParser()
    cli_release.register(parser.add_subparsers())
    args = parser.parse_args(["publish", "--wheelhouse", str(tmp_path / "absent"), "--to", "localhost:8080"])
    with pytest.raises(PublishError, match="needs a scheme"):
        args.func(args)


def test_smoke_install_default_list_is_one_version_a_package(tmp_path, capsys):
    """Two stacks' flash-attn in one wheelhouse: the default list would ask pip for both at once, so it
    is refused in one line before a venv is made; --stack / --target pick one."""
    from blackwheel import cli
    wh = tmp_path / "wh"
    h.place(h.build_wheel(tmp_path, "bw-two", "1.0+cu130.torch2.11.sm121", 1), wh, stack="a")
    h.place(h.build_wheel(tmp_path, "bw-two", "1.0+cu130.torch2.14.sm121", 2), wh, stack="b")
    h.place(h.build_wheel(tmp_path, "bw-one", "2.0", 1), wh, stack="b")
    assert cli_release.wheelhouse_requirements(wh, "a") == ["bw-two==1.0+cu130.torch2.11.sm121"]
    assert cli_release.wheelhouse_requirements(wh, "b", "gb10") == ["bw-one==2.0", "bw-two==1.0+cu130.torch2.14.sm121"]
    venv = tmp_path / "venv"
    assert cli.main(["smoke-install", "--index-url", "file:///nowhere/simple/", "--wheelhouse", str(wh),
                     "--venv", str(venv)]) == 2
    assert capsys.readouterr().err == ("blackwheel: the wheelhouse holds 2 versions of bw-two (1.0+cu130.torch2.11.sm121, "
                                       "1.0+cu130.torch2.14.sm121): give --stack and --target, or name the packages\n")
    assert not venv.exists()
