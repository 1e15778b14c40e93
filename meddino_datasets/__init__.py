"""What curation and finetuning both know about public CT data (imported by both, imports neither).

This is the ``datasets/`` layer of the design (``../shared/design/STYLE.md``), named ``meddino_datasets`` because a
top-level ``datasets`` package collides with Hugging Face's ``datasets`` library, which many users have installed:
one would overwrite the other in site-packages, and transformers imports whichever it finds.
"""
