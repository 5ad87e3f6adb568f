"""The paper's experiments as resumable units: protocols and units (suite.py), what each unit runs (units.py), parallel
workers (workers.py) and Slurm (slurm.py), the pretrained-model suite (pretrained.py), the regime study's grid
(regime.py), the demo (demo.py), and the reports with their verdict rules (report/)."""
