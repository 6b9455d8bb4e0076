"""Licensed-corpus pipeline: read, clean, tokenize and pack sources into token shards with a bill of materials."""
