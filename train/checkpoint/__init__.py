"""Checkpoints: on-disk layout (`layout`, no torch.distributed), the collective save and load (`collective`),
resharding through DeepSpeed's universal format (`universal`), compatibility checks (`compat`), RNG states (`rng`)
and weight loading for read-only tools (`weights`)."""

from train.checkpoint.layout import latest_tag, pointer_tag, read_meta, retention_victims, step_of, tag_for, verify

__all__ = ["latest_tag", "pointer_tag", "read_meta", "retention_victims", "step_of", "tag_for", "verify"]
