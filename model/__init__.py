"""Plain-PyTorch decoder models. Nothing here imports deepspeed or torch.distributed."""
