"""Diffusion workers with the FlexCache client inside their sampling loop (the reference model).

`modes.py` says what each cache mode stores and looks up, `worker.py` is one worker's loop, and
`fleet.py` runs a trace through several worker processes against one daemon.
"""
