"""Pictures of what a backbone learned: ``python -m pretrain.visualize pca|similarity|curves`` (PNG files).

One module per job, each importable on its own:

- ``config``: ``configs/visualize.yaml`` + an optional ``--config`` layer + the flags, merged strictly;
- ``inputs``: the edges: one axial CT slice from NIfTI, a backbone (checkpoint or ``random:<arch>``), the HU ->
  input mapping it was pretrained with;
- ``features``: dense patch features, CT foreground on the patch grid, PCA -> RGB, reference-patch similarity;
- ``figures``: CT + PCA / similarity panels (arrays -> ``Figure``; ``write_*_png`` for a model in memory);
- ``curves``: ``metrics.jsonl`` records -> one panel per loss / schedule / diagnostic;
- ``cli``: the subcommands (``__main__`` runs it).
"""
