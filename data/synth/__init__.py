"""Synthetic receipt-count scenes for `scripts/make_receipts.py`.

    data.synth.scene.render_scene(rng, size, receipt_count) -> (RGB image, JPEG quality)
    data.synth.paper   -- receipts and other paperwork as RGBA sheets
    data.synth.content -- invented text for them
"""
