"""A profile on request (`profile:` in the config): `torch.profiler` captures a few steps on the chosen
ranks (`capture`, worker process), each rank's trace is summarized (`summary`, pure: phases from the
`openclaw/<phase>` labels, communication from the collectives' own events, top operators and kernels,
the memory peak by category), the summaries become the advice rules' facts (`facts`, pure) and a
self-contained HTML report (`report`, pure), and rank 0 logs traces, report and advice through the
tracker under `profile/`."""
