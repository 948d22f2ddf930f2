"""Reads beneath a root (``_core.open_beneath``: ``openat2`` with ``RESOLVE_BENEATH``, or
the component walk): over random trees of folders, files and links inside and outside a
root, exactly the files beneath the root are ever read, and the two ways agree."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex._core import open_beneath

FOLDERS = ["", "a", "a/b", "c"]  # inside the root ("" is the root itself)
NAMES = ["f", "g"]
# link targets, relative to the link's folder: some stay beneath, some climb out
TARGETS = ["f", "b/f", "../f", "../../out/f", "../a/f", "b", "..", "../..", "/etc/hostname", "x"]

tree = st.fixed_dictionaries(
    {
        "files": st.sets(st.tuples(st.sampled_from(FOLDERS), st.sampled_from(NAMES)), max_size=6),
        "links": st.lists(
            st.tuples(
                st.sampled_from(FOLDERS), st.sampled_from(["x", "y"]), st.sampled_from(TARGETS)
            ),
            max_size=6,
        ),
    }
)


def _open(root: str, rel: str, walk: bool):
    try:
        fd = open_beneath(root, rel, walk)
    except OSError as e:
        return e.errno
    try:
        info = os.fstat(fd)
        return (info.st_dev, info.st_ino)
    finally:
        os.close(fd)


@settings(deadline=None, max_examples=60)
@given(tree)
def test_only_files_beneath_the_root_are_ever_read(spec):
    top = tempfile.mkdtemp()
    try:
        root, out = os.path.join(top, "root"), os.path.join(top, "out")
        for folder in FOLDERS:
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        os.makedirs(out)
        with open(os.path.join(out, "f"), "w") as f:
            f.write("outside")
        inside = {}
        for folder, name in spec["files"]:
            path = os.path.join(root, folder, name)
            with open(path, "w") as f:
                f.write("inside")
            inside[os.path.join(folder, name)] = (os.stat(path).st_dev, os.stat(path).st_ino)
        for folder, name, target in spec["links"]:
            link = os.path.join(root, folder, name)
            if not os.path.lexists(link):
                os.symlink(target, link)
        outside = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in [os.path.join(out, "f")]}
        beneath = set(inside.values())
        candidates = [
            os.path.join(folder, name)
            for folder in FOLDERS + ["x", "y", "a/x", "a/y"]
            for name in NAMES + ["x", "y"]
        ] + ["../out/f", "a/../../out/f"]
        for rel in candidates:
            auto, walk = _open(root, rel, False), _open(root, rel, True)
            assert auto == walk, (rel, auto, walk, spec)
            if isinstance(auto, tuple):
                assert auto not in outside, (rel, spec)
                # a folder is opened too (as the root's own folders are); a file must be one
                # of those made beneath the root
                if not os.path.isdir(os.path.join(root, rel)):
                    assert auto in beneath, (rel, spec)
            else:
                assert auto in (errno.EXDEV, errno.ENOENT, errno.ENOTDIR, errno.ELOOP), (rel, auto)
        for rel, ident in inside.items():  # every real file beneath the root reads
            assert _open(root, rel, False) == ident
    finally:
        shutil.rmtree(top)
