"""Models: vision encoder adapters, projector, cross-attention fusion and the InternVL2 receipt counter."""
