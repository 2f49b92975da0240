"""Causal language models: turning a user's model argument (a local folder, a ``.gguf`` file or a hub id) into a
tokenizer or a model, and what this package makes of models (pruned students, tokenizer transplants, LoRA,
generation, the output head as the loss sees it).

    load.py        find and load (folder, .gguf, hub id), refuse pickled weights, count parameters
    gguf.py        a .gguf read once and dequantized into a plain model
    rebuild.py     a model rebuilt from its config with another state dict
    folders.py     model folders this package writes
    heads.py       the decoder body and the output head as tensors
    generate.py    batched greedy or sampled answers
    prune.py       depth pruning; choose.py which layers to keep, by measurement
    transplant.py  another tokenizer for a model
    lora.py        LoRA adapters

Failures a user can fix are raised as `UserError` with a one-line message naming the flag involved.
"""
