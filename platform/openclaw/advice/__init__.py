"""Advice: rules that read a run's measured step-time breakdown (and, after a profile, its trace) with the
run's config, and recommend the change: the finding with its number, the config key and a suggested
value, and the expected effect. Pure logic (`rules`), run on the driver at the end of a run, by
`openclaw advise RUN_ID`, and on rank 0 after a profile."""
