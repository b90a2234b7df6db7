"""The APBench export (``ue_fast.data.apbench``): one PNG per image named by its data-set index."""
import json

import numpy as np
import pytest
from PIL import Image

import ue_fast
from _helpers import demo_subset
from ue_fast.cli import main as cli_main
from ue_fast.data.apbench import export_apbench


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("tf") / "in", ("airplane", "cat", "ship", "truck"), 15)


def test_export_apbench(src, tmp_path, capsys):
    ue_fast.protect(src, tmp_path / "p", method="lsp", progress=False, device="cpu")
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    out = export_apbench(tmp_path / "p", tmp_path / "apb")
    assert out == tmp_path / "apb" / "lsp_poisons" / "c10" / "data"
    assert sorted(int(p.stem) for p in out.glob("*.png")) == list(range(m["num_images"]))
    for i in (0, m["num_images"] - 1):
        with Image.open(out / f"{i}.png") as a, Image.open(tmp_path / "p" / m["files"][i]["output"]) as b:
            assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    index = json.loads((out.parent / "index.json").read_text())
    assert [e["source"] for e in index] == [f["source"] for f in m["files"]]
    # a given data-set order is followed
    order = [f["source"] for f in reversed(m["files"])]
    (tmp_path / "order.txt").write_text("\n".join(order) + "\n")
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb"), "--order",
                     str(tmp_path / "order.txt"), "--overwrite"]) == 0
    with Image.open(out / "0.png") as a, Image.open(tmp_path / "p" / m["files"][-1]["output"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert cli_main(["export-apbench", str(tmp_path / "p"), str(tmp_path / "apb")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly once"):
        export_apbench(tmp_path / "p", tmp_path / "apb2", order=order[:-1])
    with pytest.raises(ValueError, match="manifest"):
        export_apbench(src, tmp_path / "apb3")
