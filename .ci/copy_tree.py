"""Copy the working tree's files that git knows of (tracked, and untracked but not ignored)
from ROOT to DST, so a build there sees neither the checkout's build outputs nor changes it.
    usage: python .ci/copy_tree.py ROOT DST"""
import os
import shutil
import subprocess
import sys

root, dst = sys.argv[1:]
listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
for name in filter(None, map(os.fsdecode, listed)):
    if os.path.isfile(os.path.join(root, name)):
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copy2(os.path.join(root, name), os.path.join(dst, name))
