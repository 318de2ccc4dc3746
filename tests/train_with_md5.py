"""Runs train.py in a fresh process (e.g. under torchrun) after registering the MD5s of
synthetic dataset files, which cannot carry the official ones; the product is unchanged.

    python tests/train_with_md5.py MD5S.json TRAIN.PY-ARGS...
"""

import json
import sys
import types
from pathlib import Path

from torchvision import datasets

import synthetic
import train

if __name__ == "__main__":
    plain_setattr = types.SimpleNamespace(
        setattr=setattr
    )  # monkeypatch.setattr's signature
    for name, md5 in json.loads(Path(sys.argv[1]).read_text()).items():
        synthetic.register_md5(plain_setattr, getattr(datasets, name), md5)
    sys.exit(train.main(sys.argv[2:]))
