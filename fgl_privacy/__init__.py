"""What the server can learn from a silo, measured: embedding inversion (`inversion`), the
silo-side noise defence and its (epsilon, delta) (`noise`), and the report (`report`).

Not part of the Flower app: these are the attacks an honest-but-curious server could run on
what it receives, and the measurements of the defences, run offline on a finished run's config.
"""
