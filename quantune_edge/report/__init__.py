"""Stage 6, report: the run report page and the bench comparison page."""
