"""No file we write can replace something that is not a regular file.

Saved chats and their `.kv`, `cache-prompt --out` and `--prompt-cache` files, and `convert`'s
output: a character device given as the destination (`/dev/stdout`, `/dev/null`, `/dev/full`)
is written in place and stays the device, with the device's own error; so is a pipe someone reads
(`/dev/stdout | less`); a pipe nobody reads (which would block), a socket or a folder is refused
in one line before anything is written; a symlink's target is written and the link stays.
Devices are made with mknod in the test's folder (the same major
and minor numbers as /dev/null and /dev/full), so the machine's own /dev is never touched.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_mixtral
from mlx_mixtral import prompt_cache
from mlx_mixtral.chat.conversation import ChatSession, Settings
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.files import atomic_write
from mlx_mixtral.sampling import SamplingParams

NULL, FULL = (1, 3), (1, 7)


def device(folder: Path, name: str, numbers: tuple[int, int]) -> Path:
    path = folder / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(*numbers))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def is_char_device(path: Path) -> bool:
    return stat.S_ISCHR(os.lstat(path).st_mode)


@pytest.fixture(scope="module")
def loaded(hf_checkpoint_factory):
    return mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)


@pytest.fixture
def session(loaded):
    model, tokenizer = loaded
    chat = ChatSession(model, tokenizer, Settings(SamplingParams(), max_tokens=4))
    for _ in chat.stream(chat.start("Hello")):
        pass
    assert chat.cache.ids  # so a .kv would be written beside a file
    return chat


def test_a_full_device_keeps_being_the_device_and_says_so(session, tmp_path):
    full = device(tmp_path, "full", FULL)
    with pytest.raises(MixtralError) as caught:
        session.save(full)
    assert "no space left on device" in str(caught.value) and "\n" not in str(caught.value)
    assert is_char_device(full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no .kv, no temporary file


def test_a_null_device_takes_the_bytes_and_stays_a_device(session, loaded, tmp_path):
    null = device(tmp_path, "null", NULL)
    path, kept = session.save(null)
    assert is_char_device(null) and not kept and sorted(p.name for p in tmp_path.iterdir()) == ["null"]
    model, tokenizer = loaded
    prompt_cache.save(null, session.cache, tokenizer)
    atomic_write(null, "text")
    assert is_char_device(null) and sorted(p.name for p in tmp_path.iterdir()) == ["null"]
    with pytest.raises(MixtralError, match="no space left on device"):
        prompt_cache.save(device(tmp_path, "full", FULL), session.cache, tokenizer)


def test_a_device_gets_exactly_the_bytes_a_file_would(session, tmp_path):
    """/dev/stdout (a link to the process's standard output, a pipe here: `| less`): what its
    reader sees is the whole saved conversation. A link of our own to /proc/self/fd/1 stands in
    for /dev/stdout, so a broken writer could only ever replace the link in our folder."""
    file = tmp_path / "chat.json"
    session.save(file, kv=False)
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    out = subprocess.run([sys.executable, "-c", f"""
from mlx_mixtral.files import atomic_write
atomic_write({str(stdout)!r}, open({str(file)!r}, 'rb').read())
"""], capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == file.read_bytes()
    assert stdout.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "stdout"]


@pytest.mark.parametrize("kind", ["fifo", "socket", "folder"])
def test_unread_pipes_sockets_and_folders_are_refused_before_anything_is_written(session, loaded, tmp_path, kind):
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    for save in (lambda: session.save(path), lambda: prompt_cache.save(path, session.cache, loaded[1]),
                 lambda: atomic_write(path, "x")):
        with pytest.raises(MixtralError) as caught:
            save()
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]
    assert {"fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "folder": stat.S_ISDIR}[kind](os.lstat(path).st_mode)


def test_a_symlink_writes_its_target_and_stays_a_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_cli_writers_refuse_devices_they_cannot_fill_and_convert_never_replaces_one(hf_checkpoint_factory, tmp_path):
    folder = hf_checkpoint_factory("gqa")
    full = device(tmp_path, "full", FULL)
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    (tmp_path / "doc.txt").write_text("A long document.")
    r = run("cache-prompt", "--model", str(folder), "--prompt-file", str(tmp_path / "doc.txt"), "--out", str(full))
    assert r.returncode != 0 and "no space left on device" in r.stderr and "Traceback" not in r.stderr
    assert is_char_device(full)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for dst in (full, fifo):
        r = run("convert", "--hf-path", str(folder), "--mlx-path", str(dst), "--force")
        assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert is_char_device(full) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
