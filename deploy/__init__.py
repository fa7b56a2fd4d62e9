"""Running the app on this machine: the launcher (`python -m deploy.launch`), the quickstart,
the comparison grid and the TLS material. Not part of the Flower app (never in its FAB).

`processes` supervises the processes a launch starts (psutil), `flower_cli` wraps the `flwr`
command line, `federation` starts a SuperLink and its SuperNodes with both, and `launch` is the
command line on top.
"""
