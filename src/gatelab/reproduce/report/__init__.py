"""Reports beside the paper's numbers: the compact suite (compact.py, with readings, block, regime sections), the
pretrained suite (pretrained.py), verdicts and their rules with history (verdicts.py, criteria.py), paired statistics."""
