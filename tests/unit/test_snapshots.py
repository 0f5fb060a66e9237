"""Weight snapshots (attnlab.model.snapshots): the files round trip, prune by step and fingerprint; the
snapshots of real training runs are tests/e2e/test_snapshots_training.py's."""

from __future__ import annotations

import torch
from builders import tiny_model

from attnlab.model.checkpoint import load_model
from attnlab.model.snapshots import (
    SNAPSHOT_DTYPE,
    list_snapshots,
    prune_snapshots,
    save_snapshot,
    snapshot_meta,
)


def test_save_list_prune_round_trip(tmp_path):
    model = tiny_model(vocab_size=61)
    folder = tmp_path / "snapshots"
    assert list_snapshots(folder) == [] and prune_snapshots(folder, 0) == []  # no folder yet
    for step in (12, 3, 6):
        save_snapshot(folder, model, step, step * 100, fingerprint="run-a")
    (folder / "notes.txt").write_text("not a snapshot")
    (folder / ".step_000015.pt.x1y2.tmp").write_bytes(b"a write killed midway")
    assert [step for step, _ in list_snapshots(folder)] == [3, 6, 12]
    assert [p.name for _, p in list_snapshots(folder)] == ["step_000003.pt", "step_000006.pt", "step_000012.pt"]

    path = list_snapshots(folder)[1][1]
    payload = torch.load(path, weights_only=True)
    assert all(v.dtype == SNAPSHOT_DTYPE for v in payload["state_dict"].values() if v.is_floating_point())
    assert snapshot_meta(path) == {"step": 6, "train_tokens": 600, "fingerprint": "run-a"}
    loaded, meta = load_model(path)  # back into a float32 Transformer, as the analysis stages load it
    assert meta["train_tokens"] == 600 and loaded.cfg == model.cfg
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, model.state_dict()[name].half().float(), rtol=0, atol=0)

    assert [p.name for p in prune_snapshots(folder, after_step=6, fingerprint="run-a")] == ["step_000012.pt"]
    assert [step for step, _ in list_snapshots(folder)] == [3, 6]
    assert not (folder / ".step_000015.pt.x1y2.tmp").exists() and (folder / "notes.txt").exists()
    assert len(prune_snapshots(folder, after_step=6, fingerprint="run-b")) == 2  # another run's: all go
    assert list_snapshots(folder) == []
