"""The scheduled, incremental refresh (jobs/refresh.py, `c2s refresh`): only new or changed datasets are
rebuilt, withdrawn ones dropped, unchanged ones reused where an earlier version wrote them; the result equals a
full build of the new source, row for row; an unchanged source commits nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_h5ad

from c2s.corpus import read_table
from etl.build_corpus import refresh_main
from etl.config import BuildConfig
from etl.pipeline import build
from etl.validate import validate
from etl.versions import Versions
from schemas.layout import resolve

OPTS = ["--organism", "human", "--cell-type-column", "celltype", "--tasks", "cell_type_prediction,cell_lm",
        "--cells-per-task", "70", "--no-spark"]


def _h5ad(files: list[str]) -> list[str]:
    return [x for f in files for x in ("--h5ad", f)]


def _refresh(capsys, files: list[str], out: str, *extra: str) -> dict:
    assert refresh_main([*_h5ad(files), *OPTS, "--output-dir", out, *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _full(files: list[str], out: str) -> dict:
    assert refresh_main([*_h5ad(files), *OPTS, "--output-dir", out]) == 0
    return resolve(out).manifest


def _vocab(out: str) -> dict[str, int]:
    t = read_table(out, "vocab", columns=["gene_symbol", "n_cells"])
    return dict(zip(t["gene_symbol"], t["n_cells"], strict=True))


def _rows(out: str) -> list[tuple]:
    t = read_table(out, "sentences", columns=["dataset_id", "cell_id", "genes"])
    return sorted((d, c, tuple(g)) for d, c, g in zip(t["dataset_id"], t["cell_id"], t["genes"], strict=True))


def test_refresh_rebuilds_only_changed_datasets_and_equals_a_full_build(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    a, _ = write_h5ad(d / "a.h5ad", n_cells=150, n_genes=60, seed=1)
    b, _ = write_h5ad(d / "b.h5ad", n_cells=120, n_genes=60, seed=2)
    c, _ = write_h5ad(d / "c.h5ad", n_cells=90, n_genes=60, seed=3)
    out = str(tmp_path / "corpus")

    first = _refresh(capsys, [a, b, c], out)  # no corpus yet: a full build
    assert first["committed"] and first["unchanged"] == 0
    assert first["rebuilt"] == ["homo_sapiens/a", "homo_sapiens/b", "homo_sapiens/c"]
    v1 = first["version"]

    again = _refresh(capsys, [a, b, c], out)  # nothing changed: nothing committed
    assert again == {**first, "committed": False, "rebuilt": [], "removed": [], "unchanged": 3}
    import os

    for f in (a, b, c):  # touched (a re-sync): the same content, so still nothing to commit
        os.utime(f, (1e9, 1e9))
    assert _refresh(capsys, [a, b, c], out) == again
    assert Versions(out).committed() == [v1]

    # b rewritten with other counts, c withdrawn, d new (with genes no other file has)
    write_h5ad(d / "b.h5ad", n_cells=120, n_genes=60, seed=22)
    dd, _ = write_h5ad(d / "d.h5ad", n_cells=80, n_genes=75, seed=4)
    r = _refresh(capsys, [a, b, dd], out)
    assert r["committed"] and r["version"] != v1
    assert r["rebuilt"] == ["homo_sapiens/b", "homo_sapiens/d"]
    assert r["removed"] == ["homo_sapiens/c"] and r["unchanged"] == 1

    m = resolve(out).manifest
    # a's parts are read where the first version wrote them; nothing of a was written again
    a_parts = {rel: i for rel, i in m["files"].items() if "/a/" in rel}
    assert a_parts and all(i["version"] == v1 for i in a_parts.values())
    new_dir = Path(out, "versions", r["version"], "sentences", "homo_sapiens")
    assert sorted(p.name for p in new_dir.iterdir()) == ["b", "d"]
    validate(out, deep=True)

    # the truth: a full build of the new source, elsewhere
    full = _full([a, b, dd], str(tmp_path / "full"))
    assert r["content_hash"] == full["content_hash"]
    assert r["samples_hash"] == full["samples"]["samples_hash"]
    assert _rows(out) == _rows(str(tmp_path / "full"))
    assert _vocab(out) == _vocab(str(tmp_path / "full"))  # n_cells: c's share out, b's new share in
    assert m["counts"] == full["counts"]

    # readers: pandas/pyarrow through the API, and datasets through the card's data_files
    from datasets import load_dataset

    ds = load_dataset(out, "sentences", split="train")
    assert ds.num_rows == full["counts"]["totals"]["written"]
    assert sorted(set(ds["dataset_id"])) == ["a", "b", "d"]

    # a refresh of the refresh keeps pointing a's parts at the first version; pruning keeps what is reused
    write_h5ad(d / "d.h5ad", n_cells=80, n_genes=75, seed=44)
    r3 = _refresh(capsys, [a, b, dd], out, "--keep-versions", "1")
    assert r3["rebuilt"] == ["homo_sapiens/d"] and r3["unchanged"] == 2
    m3 = resolve(out).manifest
    assert {i["version"] for rel, i in m3["files"].items() if "/a/" in rel} == {v1}
    assert {i["version"] for rel, i in m3["files"].items() if "/b/" in rel} == {r["version"]}
    assert set(Versions(out).committed()) == {v1, r["version"], r3["version"]}  # all three still needed
    validate(out, deep=True)
    assert r3["content_hash"] == _full([a, b, dd], str(tmp_path / "full3"))["content_hash"]


def test_refresh_of_a_census_release(demo_census, tmp_path, capsys):
    """A new release where one dataset got a new dataset_version_id and mouse left the selection: only that
    dataset is rebuilt; the result equals a full build of the new release."""
    import pyarrow as pa
    import tiledbsoma

    out = str(tmp_path / "corpus")
    opts = ["--tasks", "cell_type_prediction", "--cells-per-task", "150", "--no-spark", "--output-dir", out]
    assert refresh_main(["--census-uri", demo_census, "--organisms", "homo_sapiens,mus_musculus", *opts]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    human = [k for k in first["rebuilt"] if k.startswith("homo_sapiens/")]
    mouse = [k for k in first["rebuilt"] if k.startswith("mus_musculus/")]
    assert len(human) >= 2 and mouse

    release = str(tmp_path / "release2")
    shutil.copytree(demo_census, release)
    uri = f"{release}/census_info/datasets"
    with tiledbsoma.DataFrame.open(uri) as df:
        t = df.read().concat()
        schema = df.schema
    changed = human[0].split("/", 1)[1]
    ids = t["dataset_version_id"].to_pylist()
    ids[t["dataset_id"].to_pylist().index(changed)] = "a-new-dataset-version"
    t = t.set_column(t.schema.get_field_index("dataset_version_id"), "dataset_version_id", pa.array(ids))
    shutil.rmtree(uri)
    index = [n for n in ("soma_joinid",) if n in schema.names]
    with tiledbsoma.DataFrame.create(uri, schema=schema.remove(schema.get_field_index("soma_joinid")),
                                     index_column_names=index, domain=[(0, max(len(ids) - 1, 0))]) as df:
        df.write(t.select(schema.names))

    assert refresh_main(["--census-uri", release, "--organisms", "homo_sapiens", *opts]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["committed"] and r["rebuilt"] == [human[0]]
    assert r["removed"] == sorted(mouse) and r["unchanged"] == len(human) - 1
    full = build(BuildConfig(output=str(tmp_path / "full"), census_uri=release, organisms=["homo_sapiens"],
                             tasks=["cell_type_prediction"], cells_per_task=150))
    assert r["content_hash"] == full["content_hash"]
    assert r["samples_hash"] == full["samples"]["samples_hash"]
    validate(out, deep=True)


def test_a_reader_keeps_its_version_while_a_refresh_commits(tmp_path, capsys):
    """A trainer resolves `latest` once; a refresh committing meanwhile changes what new readers see, not the
    files the running one reads; a lease keeps --keep-versions from deleting them until it ends."""
    from schemas.layout import reader_lease

    d = tmp_path / "in"
    d.mkdir()
    a, _ = write_h5ad(d / "a.h5ad", n_cells=100, n_genes=40, seed=1)
    out = str(tmp_path / "corpus")
    _refresh(capsys, [a], out)
    reading = resolve(out)
    files = reading.sentence_files()
    with reader_lease(out, reading.version):
        write_h5ad(d / "a.h5ad", n_cells=100, n_genes=40, seed=9)
        r = _refresh(capsys, [a], out, "--keep-versions", "1")
        assert r["committed"] and resolve(out).version == r["version"] != reading.version
        assert all(pq.read_table(f).num_rows > 0 for f in files)  # still there: leased
    write_h5ad(d / "a.h5ad", n_cells=100, n_genes=40, seed=10)
    _refresh(capsys, [a], out, "--keep-versions", "1")
    assert not Path(files[0]).exists()  # the lease ended: pruned like any old version
    assert np.isfinite(len(Versions(out).committed()))


@pytest.mark.parametrize("argv", [["--help"]])
def test_refresh_help_teaches(argv, capsys):
    with pytest.raises(SystemExit) as e:
        refresh_main(argv, prog="jobs/refresh.py")
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "incrementally" in text and "content_hash" in text and "--keep-versions" in text


def test_training_reads_the_version_it_resolved_under_a_lease(tmp_path, capsys, monkeypatch):
    """`c2s train --corpus DIR` resolves latest once: the run reads that version folder, holds a lease on it
    while it runs (so --keep-versions cannot delete it), and records the version it read."""
    import schemas.layout as layout
    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    d = tmp_path / "in"
    d.mkdir()
    a, _ = write_h5ad(d / "a.h5ad", n_cells=120, n_genes=40, seed=1)
    out = str(tmp_path / "corpus")
    first = _refresh(capsys, [a], out)
    seen = []
    real = layout.leased_versions

    def spy(uri):  # what a pruning refresh would see while the run trains
        seen.append(real(uri))
        return seen[-1]

    import training.sft_trainer as trainer_module

    original = trainer_module._train

    def during(cfg):
        spy(out)
        return original(cfg)

    monkeypatch.setattr(trainer_module, "_train", during)
    res = train(SFTConfig(model="tiny-pythia", corpus=out, output_dir=str(tmp_path / "sft"), max_steps=2,
                          per_device_batch_size=2, max_length=256, eval_steps=0, save_steps=0, eval_cells=0,
                          report_to="none", warmup_steps=1))
    assert seen == [{first["version"]}]  # leased while training
    assert real(out) == set()  # released at the end
    prov = json.loads(Path(res.final_dir, "c2s.json").read_text())
    assert first["version"] in json.dumps(prov)


def test_a_lease_is_renewed_while_its_reader_runs(tmp_path, capsys):
    import time

    from schemas.layout import leased_versions, reader_lease

    d = tmp_path / "in"
    d.mkdir()
    a, _ = write_h5ad(d / "a.h5ad", n_cells=60, n_genes=30, seed=1)
    out = str(tmp_path / "corpus")
    v = _refresh(capsys, [a], out)["version"]
    with reader_lease(out, v, ttl_hours=0.5 / 3600):  # a 0.5 s lease, renewed every 0.125 s
        time.sleep(1.2)
        assert leased_versions(out) == {v}  # outlived its first expiry: renewed
    assert leased_versions(out) == set()
