"""The experiment runner around the core: run, score, record, tabulate, track."""
