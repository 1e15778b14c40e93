"""What curation and finetuning both know about public CT data (imported by both, imports neither)."""
