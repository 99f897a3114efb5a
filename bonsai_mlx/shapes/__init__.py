"""Coloured-shapes demo: a synthetic GenEval-like task for a small FLUX.2 klein model.

scenes   what a prompt asks for (categories, colours, shapes, relations), the prompt
         spaces and the train / held-out split
render   deterministic 128x128 images of a scene
score    GenEval-style scoring of an image by colour segmentation and shape analysis
evaluate `python -m bonsai_mlx eval-shapes`: generate the held-out prompts and score them
tokenizer  the demo model's small byte-level BPE tokenizer, built offline
train    (PyTorch, for the GPU) the VAE / DiT / QAT training stages
"""
