"""How `fgl-mini` is made: its training program (`train`), the glyph corpus it learns from
(`corpus`) and the judge of its label fidelity (`fidelity`).

None of this runs in a federation: silos and the server load the shipped weights through
`fgl_core.mini`, which is all the runtime holds of the miniature generator. This package is not
part of the Flower app's FAB or image.
"""
