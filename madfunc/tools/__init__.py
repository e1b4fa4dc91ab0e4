"""What users run around the transforms: ``compare``/``inspect`` (``diagnostics.py``) and their reports,
the command line (``cli.py``) and the demo (``demo.py``)."""
