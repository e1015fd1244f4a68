"""The report stage: a markdown page of the current run (page.py) and a comparison of every
experiment (experiments.py reads them from git, compare.py tabulates and charts them); stage.py
writes both. Nothing is imported here, so `rtmdet --help` stays light."""
