"""Stand-in for `cairosvg` (our own code). processor_omni.py does `from cairosvg import svg2png` at
module level and calls it only when image bytes cannot be opened by PIL (vector images). Raises."""


def svg2png(*args, **kwargs):
    raise RuntimeError("cairosvg stub: SVG rasterisation is not available in the reference venv")
