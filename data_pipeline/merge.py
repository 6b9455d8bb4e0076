"""`python -m data_pipeline.merge data=NAME tokenizer.path=TOK out=OUT`: prepare's global pass over parts' results.

Merges parts run independently with `data.num_shards=N data.shard_index=i` (same data config, same OUT); it is the
same as `python -m data_pipeline.prepare` without data.shard_index, which reuses finished per-file results. The
global pass itself is global_pass.py.
"""

from __future__ import annotations

import hydra

from data_pipeline.prepare import run_cli


@hydra.main(config_path="../configs", config_name="merge", version_base="1.3")
def main(cfg) -> None:
    cfg.data.shard_index = None
    run_cli(cfg)


if __name__ == "__main__":
    main()
