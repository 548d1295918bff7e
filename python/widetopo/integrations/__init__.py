"""Trainer callbacks: prune at the start of training and keep the pruned weights at zero.

    widetopo.integrations.lightning.WidetopoPruning   # a lightning.pytorch.Callback
    widetopo.integrations.hf.WidetopoPruning          # a transformers.TrainerCallback

Both prune the model once, on the first batches of the trainer's own training data (or data you
pass), then keep every pruned weight and its optimizer state (momentum buffers, Adam moments)
exactly zero after every optimizer step with widetopo.MaskEnforcer. The framework-free part is
widetopo.integrations.common.PruneAtStart. Nothing here imports Lightning or transformers until
a callback class is asked for: `pip install "widetopo[lightning]"` / `"widetopo[hf]"`.
"""
