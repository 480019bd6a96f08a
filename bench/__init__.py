"""FlexCache benchmarks: one module per benchmark, run from the repository root as
`python -m bench.<name>`; `harness` pieces (traces, report, the data files) are shared by them."""
