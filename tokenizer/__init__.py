"""Korean-centric SentencePiece tokenizer: training, Hugging Face files, loading by path."""
